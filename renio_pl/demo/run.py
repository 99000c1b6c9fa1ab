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

ASSETS = Path("demo_assets")


def find_config(name: str = "demo.yaml") -> Path:
    """`configs/<name>` in the working directory or the checkout this package runs from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "configs" / name).is_file():
            return root / "configs" / name
    sys.stderr.write(f"error: configs/{name} not found; run renio-pl-demo from the renio-pl checkout\n")
    raise SystemExit(2)


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
