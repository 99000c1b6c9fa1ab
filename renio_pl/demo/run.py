"""`renio-pl-demo`: build (or reuse) the demo assets, then `renio-pl fit --config configs/demo.yaml`.

Extra arguments go to `renio-pl fit` (e.g. `renio-pl-demo --trainer.max_epochs 2`).
`--assets-only` builds the assets and stops. `--task trace` runs the reasoning demo instead:
assets in `demo_assets_trace/`, config `configs/demo_reasoning.yaml` (completions written
out digit by digit with their carries; see `renio_pl.demo.task`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from renio_pl.cli import main as cli_main
from renio_pl.demo.task import DemoSpec, build_assets, reasoning_spec
from renio_pl.errors import ConfigError
from renio_pl.resources import shipped_path

ASSETS = Path("demo_assets")
TASKS = {  # task -> (assets folder, config, assets' spec)
    "answer": (ASSETS, "demo.yaml", DemoSpec),
    "trace": (Path("demo_assets_trace"), "demo_reasoning.yaml", reasoning_spec),
}


def find_config(name: str = "demo.yaml") -> Path:
    """`configs/<name>` in the working directory, else the one shipped with renio-pl (checkout or wheel)."""
    if (Path.cwd() / "configs" / name).is_file():
        return Path.cwd() / "configs" / name
    try:
        return shipped_path(f"configs/{name}")
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = "answer"
    if "--task" in argv:
        at = argv.index("--task")
        task = argv[at + 1] if at + 1 < len(argv) else ""
        if task not in TASKS:
            sys.stderr.write(f"error: --task must be one of {', '.join(TASKS)}; got {task!r}\n")
            raise SystemExit(2)
        del argv[at : at + 2]
    folder, name, spec = TASKS[task]
    config = find_config(name)
    try:
        build_assets(folder, spec())
    except RuntimeError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(1) from None
    if "--assets-only" in argv:
        return
    # the demo data marks each problem carry / no_carry: accuracy per group in the diagnostics
    cli_main(["fit", "--config", str(config), "--data.group_field", "group", *[a for a in argv if a != "--assets-only"]])


if __name__ == "__main__":
    main()
