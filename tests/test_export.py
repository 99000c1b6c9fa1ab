"""`renio-pl-export`: every kind of fit checkpoint becomes a folder that transformers, vLLM and `renio-pl test` load.

The exported weights are checked against the checkpoint's own student (rebuilt with
`load_from_checkpoint`), and on the demo the exported model's held-out accuracy against the
checkpoint's.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from renio_pl.cli import main
from renio_pl.export import main as export_main
from renio_pl.losses import REDILoss
from renio_pl.module import DistillationModule
from renio_pl.offline.cli import main as redi_main
from renio_pl.offline.module import OfflineDistillationModule
from renio_pl.weighters import ReNIOWeighter
from tests.conftest import REPO, TEST_CHAT_TEMPLATE, small_fit

INPUT = torch.tensor([[5, 9, 14, 20, 7, 3, 11]])  # any token ids of the test tokenizer


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def assert_exported(folder: Path, student: torch.nn.Module) -> None:
    """`folder` loads with transformers, computes what `student` computes, and carries tokenizer and generation config."""
    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(exported), logits(student.eval()), atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == TEST_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "u:1+1\na:"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id == 1 and generation["pad_token_id"] == 0


def test_lora_opd_run_exports_merged_weights_and_a_peft_adapter(model_dirs, prompt_file, tmp_path):
    from peft import PeftModel

    run = small_fit(model_dirs, prompt_file, tmp_path / "run", [], "--trainer.max_steps", "2",
                    model={"student_lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}})
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = DistillationModule.load_from_checkpoint(checkpoint)  # once: Unexpected key "weighter.ema_mean"
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert isinstance(module.weighter, ReNIOWeighter) and module.weighter.normalization == "ema"
    assert torch.equal(module.weighter.ema_mean, saved["weighter.ema_mean"])
    base = AutoModelForCausalLM.from_pretrained(model_dirs["student"], dtype=torch.float32).eval()
    assert not torch.allclose(logits(module.student.eval()), logits(base), atol=1e-4)  # the adapter learned something

    export_main([str(checkpoint), str(tmp_path / "merged")])
    assert_exported(tmp_path / "merged", module.student)
    assert not list((tmp_path / "merged").glob("adapter_*"))

    export_main([str(checkpoint), str(tmp_path / "adapter"), "--adapter"])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dirs["student"]) and config["r"] == 4
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(adapted), logits(module.student), atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "adapter").chat_template == TEST_CHAT_TEMPLATE


def test_opsd_and_redi_checkpoints_export(model_dirs, tmp_path):
    """OPSD (a full student taught by its own initial weights) and REDI (renio-pl-redi fit) checkpoints."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(
        json.dumps({"prompt": f"What is {a}+{a}?", "answer": str(2 * a), "solution": f"{a}+{a}={2 * a}"}) + "\n"
        for a in range(8)
    ))
    opsd = small_fit(model_dirs, problems, tmp_path / "opsd", [], "--trainer.max_steps", "2",
                     model={"teacher": None}, data={"solution_field": "solution"})
    assert opsd.returncode == 0, opsd.stderr[-3000:]
    checkpoint = tmp_path / "opsd" / "checkpoints" / "last.ckpt"
    export_main([str(checkpoint), str(tmp_path / "opsd_model")])
    assert_exported(tmp_path / "opsd_model", DistillationModule.load_from_checkpoint(checkpoint).student)

    traces = tmp_path / "redi.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What is 1+2?", "positive": "3", "negative": "4"}, {"prompt": "2+2?", "positive": "4", "negative": "22"},
    ]))
    redi_main(["fit", "--model.student", str(model_dirs["student"]), "--model.objective", "REDILoss",
               "--model.objective.alpha", "0.5", "--model.optimizer.lr", "0.01", "--data.train_path", str(traces),
               "--data.batch_size", "2", "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(tmp_path / "redi"), "--trainer.callbacks+=ModelCheckpoint",
               "--trainer.callbacks.dirpath", str(tmp_path / "redi" / "checkpoints"), "--trainer.callbacks.save_last", "true"])
    checkpoint = tmp_path / "redi" / "checkpoints" / "last.ckpt"
    restored = OfflineDistillationModule.load_from_checkpoint(checkpoint)
    assert isinstance(restored.objective, REDILoss) and restored.objective.alpha == 0.5  # the objective too
    export_main([str(checkpoint), str(tmp_path / "redi_model")])
    assert_exported(tmp_path / "redi_model", restored.student)
    initial = AutoModelForCausalLM.from_pretrained(model_dirs["student"], dtype=torch.float32).eval()
    assert not torch.allclose(logits(restored.student), logits(initial), atol=1e-4)  # it is the trained student


def test_bad_export_input_is_one_line(model_dirs, tmp_path, capsys):
    def export_error(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            export_main(list(args))
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip()

    assert export_error(str(tmp_path / "none.ckpt"), "out") == (
        f"error: checkpoint {tmp_path / 'none.ckpt'} does not exist; give a .ckpt file (e.g. <run>/checkpoints/last.ckpt)"
    )
    not_ours = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {}}, not_ours)
    assert "is not a checkpoint of renio-pl fit or renio-pl-redi fit" in export_error(str(not_ours), "out")
    (tmp_path / "sharded.ckpt").mkdir()
    assert "is a sharded checkpoint folder" in export_error(str(tmp_path / "sharded.ckpt"), "out")
    full = DistillationModule(str(model_dirs["student"]))
    checkpoint = tmp_path / "full.ckpt"
    torch.save({"state_dict": full.state_dict(), "hyper_parameters": dict(full.hparams)}, checkpoint)
    assert "--adapter needs a LoRA run" in export_error(str(checkpoint), "out", "--adapter")
    moved = export_error(str(checkpoint), "out", "--student", str(tmp_path / "gone"))
    assert moved.startswith(f"error: --student: model folder {tmp_path / 'gone'} does not exist")


# --- the demo, end to end: fit, keep the best checkpoint, export it, evaluate it -----------------
DEMO = REPO / "configs" / "demo.yaml"
HELD_OUT = json.dumps([{"name": "heldout", "path": "demo_assets/heldout.jsonl", "prompt_field": "prompt"}])
GREEDY = json.dumps({"n": 1, "temperature": 0.0, "max_new_tokens": 6})  # the demo's val_sampling


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> dict:
    """A 2-round demo fit on small demo assets (real processes); its best checkpoint exported with renio-pl-export."""
    from renio_pl.demo.task import DemoSpec, ModelSpec, build_assets

    root = tmp_path_factory.mktemp("demo")
    build_assets(root / "demo_assets", DemoSpec(teacher=ModelSpec(64, 2, 2, 128, sft_steps=300, seed=1),
                                                student=ModelSpec(64, 2, 2, 128, sft_steps=300, seed=2),
                                                teacher_min_accuracy=0.0))  # the export needs any model, not a good teacher
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    fit = subprocess.run(
        [sys.executable, "-m", "renio_pl.cli", "fit", "--config", str(DEMO), "--trainer.max_epochs", "2",
         "--data.prompts_per_epoch", "64", "--trainer.enable_progress_bar", "false"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = root / "runs" / "demo" / "version_0"
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    export = subprocess.run([sys.executable, "-m", "renio_pl.export", str(best), "exported"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    return {"root": root, "run": run, "best": best}


def held_out_accuracy(root: Path, name: str, *args: str) -> float:
    """`renio-pl test` on the demo's held-out problems with its greedy validation sampling."""
    main(["test", "--config", str(DEMO), "--data.test_sets", HELD_OUT, "--data.test_sampling", GREEDY,
          "--trainer.logger.init_args.save_dir", str(root / name), "--trainer.enable_progress_bar", "false", *args])
    (metrics,) = (root / name).rglob("metrics.csv")
    return float(next(csv.DictReader(metrics.open()))["test/heldout/avg@1"])


@pytest.mark.slow
def test_demo_best_checkpoint_exports_to_a_model_with_its_held_out_accuracy(demo_export, monkeypatch):
    root, best = demo_export["root"], demo_export["best"]
    monkeypatch.chdir(root)
    rows = list(csv.DictReader((demo_export["run"] / "metrics.csv").open()))
    val = [float(r["val/accuracy"]) for r in rows if r["val/accuracy"] and r["step"] != "0"]  # after each round
    assert len(val) == 2
    score = float(re.search(r"val_accuracy=([0-9.]+)\.ckpt$", best.name).group(1))
    assert score == round(max(val), 4)  # the best round is the one kept, and its name says so
    from_checkpoint = held_out_accuracy(root, "eval_checkpoint", "--ckpt_path", str(best))
    from_export = held_out_accuracy(root, "eval_exported", "--model.student", "exported", "--model.teacher", "null")
    assert from_export == from_checkpoint == max(val)


VLLM_SCRIPT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from renio_pl.evaluators.math import is_correct
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=64, enforce_eager=True,
          kv_cache_memory_bytes=1 << 28, enable_chunked_prefill=False, max_num_batched_tokens=8192)
rows = [json.loads(line) for line in open(sys.argv[2])]
outputs = llm.chat([[{"role": "user", "content": r["prompt"]}] for r in rows],
                   SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
correct = [is_correct(o.outputs[0].text, r["answer"]) for o, r in zip(outputs, rows)]
print(json.dumps({"accuracy": sum(correct) / len(rows)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_serves_the_exported_demo_model_with_the_same_accuracy(demo_export, monkeypatch):
    """vLLM loads the folder as it is (weights, tokenizer, chat template, EOS) and scores what `renio-pl test` does."""
    root = demo_export["root"]
    monkeypatch.chdir(root)
    expected = held_out_accuracy(root, "eval_for_vllm", "--model.student", "exported", "--model.teacher", "null")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"}
    process = subprocess.Popen([sys.executable, "-c", VLLM_SCRIPT, "exported", "demo_assets/heldout.jsonl"], cwd=root,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, err[-3000:]
    # the same number correct of the 500: `expected` went through float32 (the logged metric)
    assert json.loads(out.strip().splitlines()[-1])["accuracy"] == pytest.approx(expected, abs=1e-6)
