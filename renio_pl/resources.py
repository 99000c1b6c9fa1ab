"""The files renio-pl ships beside its code: `configs/` and the benchmark data `evaluation/data/`.

In a source checkout they sit at the repository's top level; an installed wheel carries the
same two trees inside the package (`renio_pl/_shipped/`, put there by `setup.py` at build
time). `shipped_path` finds either. `renio-pl-configs` copies them into a folder, so the
shipped configs, whose data paths are relative to the repository root, run as written there:

    renio-pl-configs                 # ./configs and ./evaluation/data
    renio-pl-configs --to my_runs    # my_runs/configs and my_runs/evaluation/data
    renio-pl-configs --list          # the shipped config files, one a line
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from renio_pl.errors import ConfigError

__all__ = ["SHIPPED", "shipped_path", "copy_shipped", "main"]

SHIPPED = ("configs", "evaluation/data")  # the trees a wheel carries, as paths from the repository root
_PACKAGE = Path(__file__).resolve().parent


def _roots() -> list[Path]:
    """Where shipped files may be: inside the installed package, then the checkout the package runs from."""
    return [_PACKAGE / "_shipped", _PACKAGE.parent]


def shipped_path(relative: str, must_exist: bool = True) -> Path:
    """The shipped file or folder at `relative` (a path from the repository root, e.g. `configs/demo.yaml`).

    When it is nowhere: an error, or with `must_exist=False` the checkout's path (for a later message).
    """
    for root in _roots():
        if (root / relative).exists():
            return root / relative
    if not must_exist:
        return _roots()[-1] / relative
    raise ConfigError(
        f"{relative} is not shipped with this installation of renio-pl (looked in {_roots()[0]} and {_roots()[1]})"
    )


def copy_shipped(destination: Path, overwrite: bool = False) -> list[Path]:
    """Copy `configs/` and `evaluation/data/` under `destination`; returns the folders written.

    Existing files are left alone unless `overwrite`: a folder already there is an error naming it.
    """
    written = []
    for relative in SHIPPED:
        source, target = shipped_path(relative), destination / relative
        if target.exists() and not overwrite:
            raise ConfigError(f"{target} already exists; remove it, pick another --to, or pass --overwrite")
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    """Entry point of `renio-pl-configs`."""
    parser = argparse.ArgumentParser(
        prog="renio-pl-configs",
        description="Copy the shipped configs/ and evaluation/data/ into a folder (default: the current one).",
    )
    parser.add_argument("--to", type=Path, default=Path("."), help="the folder to copy into (default: .)")
    parser.add_argument("--overwrite", action="store_true", help="replace files that are already there")
    parser.add_argument("--list", action="store_true", help="print the shipped config files and stop")
    args = parser.parse_args(argv)
    try:
        if args.list:
            configs = shipped_path("configs")
            for path in sorted(configs.rglob("*.yaml")):
                print(path.relative_to(configs.parent).as_posix())
            return
        for folder in copy_shipped(args.to, args.overwrite):
            print(f"wrote {folder}")
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
