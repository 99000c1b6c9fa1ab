"""`renio-pl fit|validate|test|predict`: a LightningCLI over DistillationModule and OnPolicyDataModule.

No training logic lives here: only argument links and the shape of error messages. Bad input
(unknown class path, malformed YAML, wrong type, missing model or data file, bad option) is
printed as one line, `error: <problem and fix>`, with exit status 2 and no traceback.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NoReturn

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.errors import ConfigError, TrainingDiverged
from renio_pl.losses import Loss
from renio_pl.module import DistillationModule
from renio_pl.monitoring import TrainingMonitor, configure_logging, missing_package_message
from renio_pl.preemption import SIGTERM_EXIT_STATUS, StopTogether
from renio_pl.resume import (
    SaveRunConfig, dump_config, find_own_checkpoint, finished_training, read_metadata,
)
from renio_pl.rollouts import RolloutGenerator
from renio_pl.weighters import Weighter

__all__ = ["RenioCLI", "run_cli", "main"]


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
    if lines[-1].endswith(("Got value: None", "got None")):  # a required option that nothing set
        return f"option --{option} is missing: give it as --{option} VALUE or set it in a --config file"
    base = SWAPPABLE.get(option)
    if base is not None and "import path" in cause:
        names = ", ".join(sorted(c.__name__ for c in base.__subclasses__()))
        cause += f"; choose one of {names} (or a full class path)"
    return f"option --{option}: {cause}"


# Options chosen by class path, for naming the available classes in an error.
SWAPPABLE = {"model.weighter": Weighter, "model.loss": Loss, "data.engine": RolloutGenerator}


# Trainer settings every run of the suite wants, as defaults (a config or the command line may
# still set them): the one home of what each shipped config used to repeat.
TRAINER_DEFAULTS = {
    # each epoch is one rollout round with the current student (the fit-start guard insists); REDI
    # reshuffles its records each epoch (their order is keyed by seed and epoch)
    "reload_dataloaders_every_n_epochs": 1,
    "num_sanity_val_steps": 0,  # held-out accuracy is logged at step 0 by the module instead
    "plugins": [{"class_path": "renio_pl.checkpointing.AtomicCheckpointIO"}],  # a kill never corrupts last.ckpt
}


class RenioArgumentParser(LightningArgumentParser):
    """Prints a parse error as one line plus a hint, instead of usage plus a nested report."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            return super().error(message, ex)
        if (missing := missing_package_message(ex or message) or missing_package_message(message)) is not None:
            sys.stderr.write(f"error: {missing}\n")
            self.exit(2)
        sys.stderr.write(f"error: {one_line(message)} (see --help)\n")
        self.exit(2)


class RenioCLI(LightningCLI):
    """LightningCLI with `model.student` linked to `data.tokenizer`, and a `--ckpt_path last` that finds it."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.student", "data.tokenizer")
        parser.add_lightning_class_args(TrainingMonitor, "monitor")  # every run: vitals, history, completions

    def before_fit(self) -> None:
        """Resolve `--ckpt_path last` to this run's own checkpoint; stop (status 0) when the run has no training left.

        Lightning looks only in this run's own checkpoint folder, which a versioned logger
        (CSVLogger's `version_<n>`) makes a new, empty one. Here `last` is the newest `last.ckpt`
        under the run's folders trained with this run's settings (`renio_pl.resume`). A `last.ckpt`
        with other settings is refused
        in one line. With no `last.ckpt` at all, Lightning's warning stands and the run starts
        fresh (`last` can be set before the first run).
        """
        config = self.config_init[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            current = dump_config(self._parser(self.subcommand), self.config[self.subcommand])
            found, refusal = find_own_checkpoint(self.trainer, current)
            if refusal is not None:
                raise ConfigError(refusal)
            if found is not None:
                config["ckpt_path"] = ckpt_path = str(found)
                rank_zero_info(f"--ckpt_path last: resuming from {found}")
        if ckpt_path not in (None, "last", "best", "hpc", "registry") and Path(ckpt_path).exists():
            reason = finished_training(self.trainer, read_metadata(ckpt_path))
            if reason is not None:
                rank_zero_info(
                    f"the run of {ckpt_path} has finished: {reason}; nothing to resume. To train on, raise "
                    f"trainer.max_epochs or trainer.max_steps; to use it, renio-pl-export {ckpt_path} OUT_DIR"
                )
                raise SystemExit(0)


def run_cli(
    model_class: type[pl.LightningModule], datamodule_class: type[pl.LightningDataModule],
    parser_class: type[RenioArgumentParser], args: list[str] | None, cli_class: type[RenioCLI] = RenioCLI,
) -> None:
    """Run a `cli_class` (a `RenioCLI`) over the given classes; a `ConfigError` exits 2 and a divergence exits 1, in one line.

    Every trainer gets `StopTogether` (after SIGTERM the run writes `last.ckpt` and exits 143), and
    `TRAINER_DEFAULTS` as its defaults.
    """
    configure_logging()
    try:
        cli_class(
            model_class, datamodule_class, save_config_callback=SaveRunConfig, save_config_kwargs={"overwrite": True},
            parser_class=parser_class, args=args, trainer_defaults=TRAINER_DEFAULTS | {"callbacks": [StopTogether()]},
        )
    except SIGTERMException:
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None
    except TrainingDiverged as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(1) from None
    except (ValueError, ModuleNotFoundError) as error:  # a logger or strategy whose package is missing
        if (message := missing_package_message(error)) is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None


def main(args: list[str] | None = None) -> None:
    """Entry point of `renio-pl`."""
    run_cli(DistillationModule, OnPolicyDataModule, RenioArgumentParser, args)


if __name__ == "__main__":
    main()
