"""Every shipped YAML under `configs/` parses, as the command it is written for reads it.

- fit configs (`configs/*.yaml`, `configs/paper/*.yaml`): `renio-pl fit` or, for REDI's,
  `renio-pl-redi fit`, with `--print_config`; each keeps periodic and last checkpoints, written
  atomically;
- evaluation configs (`configs/eval/` files that name their benchmarks): `renio-pl test`;
- the trace builder's config: `renio-pl-redi-traces`;
- overlays: on top of each config they are meant for (`OVERLAYS`);
- fragments (a file another config names as the value of an option, e.g.
  `prompt_format: math_prompt.yaml`): inside every config that includes them.

A YAML in none of these groups fails `test_every_shipped_yaml_is_parsed_by_a_test`. Checks of
one config's own values stay with the feature they configure (tests/test_paper_configs.py,
tests/test_redi.py, tests/test_trd.py, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from renio_pl.cli import main as renio_main
from renio_pl.offline.cli import main as redi_main
from renio_pl.offline.traces import main as traces_main
from tests.conftest import REPO

CONFIGS = REPO / "configs"
EVERY_YAML = sorted(CONFIGS.rglob("*.yaml"))


def includes(config: Path) -> set[Path]:
    """The config files `config` names as option values (paths relative to `config`'s folder)."""
    found, values = set(), [yaml.safe_load(config.read_text())]
    while values:
        value = values.pop()
        if isinstance(value, dict):
            values += value.values()
        elif isinstance(value, list):
            values += value
        elif isinstance(value, str) and value.endswith(".yaml") and (config.parent / value).is_file():
            found.add((config.parent / value).resolve())
    return found


# overlay -> the configs it is applied on top of (`--config BASE --config OVERLAY`)
STRATEGY_BASES = ["opd_qwen3_1.7b.yaml", "opsd_qwen3_1.7b.yaml", "opsd_r1_distill_qwen_7b.yaml",
                  "trd_qwen3_1.7b_opd.yaml", "trd_qwen3_1.7b_opsd.yaml"]
OVERLAYS = {
    CONFIGS / "demo_vllm.yaml": [CONFIGS / "demo.yaml"],
    CONFIGS / "demo_teacher_server.yaml": [CONFIGS / "demo.yaml"],
    **{overlay: [CONFIGS / "paper" / base for base in STRATEGY_BASES] for overlay in sorted(CONFIGS.glob("strategies/*.yaml"))},
}
TRACES = [CONFIGS / "demo_redi_traces.yaml"]  # renio-pl-redi-traces
FRAGMENTS = sorted({path for config in EVERY_YAML for path in includes(config)})
EVAL = sorted(p for p in CONFIGS.glob("eval/*.yaml") if p not in FRAGMENTS)
FIT = sorted({*CONFIGS.glob("*.yaml"), *CONFIGS.glob("paper/*.yaml")} - {*OVERLAYS, *TRACES, *FRAGMENTS})
REDI = {p for p in FIT if p.name.startswith(("demo_redi", "redi_"))}  # renio-pl-redi fit


def command_of(config: Path) -> Callable[[list[str]], None]:
    return redi_main if config in REDI else renio_main


def printed(main: Callable[[list[str]], None], args: list[str], capsys) -> dict:
    """The full config that `main(args + ["--print_config"])` prints (it must exit 0)."""
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    output = capsys.readouterr()
    assert exit_info.value.code in (0, None), output.err[-2000:]
    return yaml.safe_load(output.out)


def name(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_every_shipped_yaml_is_parsed_by_a_test():
    grouped = [*FIT, *EVAL, *TRACES, *OVERLAYS, *FRAGMENTS]
    assert sorted(grouped) == EVERY_YAML  # each file in exactly one group
    assert len(FIT) >= 12 and len(EVAL) >= 8 and len(REDI) == 4 and len(OVERLAYS) >= 6
    included = {path for config in [*FIT, *EVAL, *OVERLAYS] for path in includes(config)}
    assert set(FRAGMENTS) == included  # every fragment is parsed inside a config parsed below


@pytest.mark.parametrize("config", FIT, ids=name)
def test_every_fit_config_parses_with_periodic_and_last_checkpoints(config, capsys):
    config_printed = printed(command_of(config), ["fit", "--config", str(config)], capsys)
    assert config_printed["model"]["student"] and config_printed["data"]["train_path"]
    checkpoints = [c for c in config_printed["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert checkpoints and checkpoints[0]["init_args"]["save_last"] is True  # periodic + last.ckpt by default
    assert checkpoints[0]["init_args"]["every_n_train_steps"] > 0
    trainer = config_printed["trainer"]  # renio-pl's defaults, which no config repeats
    assert trainer["plugins"][0]["class_path"] == "renio_pl.checkpointing.AtomicCheckpointIO"
    assert (trainer["reload_dataloaders_every_n_epochs"], trainer["num_sanity_val_steps"]) == (1, 0)


@pytest.mark.parametrize("config", EVAL, ids=name)
def test_every_eval_config_parses_with_the_paper_evaluation_settings(config, capsys):
    config_printed = printed(renio_main, ["test", "--config", str(config)], capsys)
    data = config_printed["data"]
    sets = data["test_sets"]
    assert sets and all((REPO / s["path"]).is_file() for s in sets)
    code = all(s["verifier"] is not None for s in sets)  # HumanEval+ / MBPP+: graded in the sandbox
    assert data["test_sampling"] == {
        "n": 12, "temperature": 1.0, "top_p": 0.95, "top_k": 0, "max_new_tokens": 16384 if code else 38912
    }  # the paper's evaluation settings
    formats = [s["prompt_format"] for s in sets] if code else [data["prompt_format"]]
    assert all(f["chat_template_kwargs"] == {"enable_thinking": True} for f in formats)
    if code:
        assert all(s["answer_field"] == "task_id" and "```\n{problem}\n```" in s["prompt_format"]["template"]
                   for s in sets)
    assert config_printed["trainer"]["callbacks"][0]["class_path"] == "renio_pl.callbacks.EvaluationReport"


@pytest.mark.parametrize("config", TRACES, ids=name)
def test_the_trace_builder_config_parses(config, capsys):
    config_printed = printed(traces_main, ["--config", str(config)], capsys)
    assert config_printed["teacher"] and config_printed["prompts"] and config_printed["output"]


@pytest.mark.parametrize(
    "overlay, base", [(o, b) for o, bases in OVERLAYS.items() for b in bases], ids=lambda p: name(p)
)
def test_every_overlay_parses_on_the_configs_it_is_meant_for(overlay, base, capsys):
    alone = printed(command_of(base), ["fit", "--config", str(base)], capsys)
    overlaid = printed(command_of(base), ["fit", "--config", str(base), "--config", str(overlay)], capsys)
    assert overlaid != alone  # every key it sets is an option of the base's command, and it changes something
