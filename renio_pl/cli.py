"""`renio-pl fit|validate|test|predict`: a LightningCLI over DistillationModule and OnPolicyDataModule.

No training logic lives here: only argument links and the shape of error messages. Bad input
(unknown class path, malformed YAML, wrong type, missing model or data file, bad option) is
printed as one line, `error: <problem and fix>`, with exit status 2 and no traceback.
"""

from __future__ import annotations

import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.errors import ConfigError, TrainingDiverged
from renio_pl.losses import Loss
from renio_pl.module import DistillationModule
from renio_pl.rollouts import RolloutGenerator
from renio_pl.weighters import Weighter

__all__ = ["RenioCLI", "main"]


def one_line(message: str) -> str:
    """Condense a jsonargparse error (often nested over many lines) to its key and its cause."""
    lines = [line.strip(" -") for line in message.strip().splitlines() if line.strip(" -")]
    if not lines:
        return "invalid arguments"
    key = re.match(r'Parser key "([^"]+)"', lines[0])
    causes = [
        line for line in lines[1:]
        if not line.startswith(("Does not validate against any of the types", "Parser key"))
        and not line.endswith("Got value: None")
    ]
    cause = causes[-1] if causes else lines[0]
    if not key:
        return cause
    option = key.group(1)
    base = SWAPPABLE.get(option)
    if base is not None and "import path" in cause:
        names = ", ".join(sorted(c.__name__ for c in base.__subclasses__()))
        cause += f"; choose one of {names} (or a full class path)"
    return f"option --{option}: {cause}"


# Options chosen by class path, for naming the available classes in an error.
SWAPPABLE = {"model.weighter": Weighter, "model.loss": Loss, "data.engine": RolloutGenerator}


class RenioArgumentParser(LightningArgumentParser):
    """Prints a parse error as one line plus a hint, instead of usage plus a nested report."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            return super().error(message, ex)
        sys.stderr.write(f"error: {one_line(message)} (see --help)\n")
        self.exit(2)


class RenioCLI(LightningCLI):
    """LightningCLI with `model.student` linked to `data.tokenizer`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.student", "data.tokenizer")


def main(args: list[str] | None = None) -> None:
    """Entry point of `renio-pl`."""
    try:
        RenioCLI(
            DistillationModule,
            OnPolicyDataModule,
            save_config_kwargs={"overwrite": True},
            parser_class=RenioArgumentParser,
            args=args,
        )
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None
    except TrainingDiverged as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
