"""`renio-pl-demo`: build (or reuse) the demo assets, then `renio-pl fit --config configs/demo.yaml`.

Extra arguments go to `renio-pl fit` (e.g. `renio-pl-demo --trainer.max_epochs 2`).
`--assets-only` builds the assets and stops.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from renio_pl.cli import main as cli_main
from renio_pl.demo.task import build_assets
from renio_pl.errors import ConfigError
from renio_pl.resources import shipped_path

ASSETS = Path("demo_assets")


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
    config = find_config()
    build_assets(ASSETS)
    if "--assets-only" in argv:
        return
    cli_main(["fit", "--config", str(config), *argv])


if __name__ == "__main__":
    main()
