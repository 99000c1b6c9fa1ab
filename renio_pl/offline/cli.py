"""`renio-pl-redi fit|validate|test|predict`: `renio-pl` over OfflineDistillationModule and TraceDataModule.

The same LightningCLI as `renio-pl` (`model.student` linked to `data.tokenizer`, one-line
errors with exit status 2, a diverged run with status 1); only the two classes differ, since
`renio-pl` fixes DistillationModule and OnPolicyDataModule (it is not in subclass mode). One
link more: the data module's `stage` follows `model.objective`, so it is not an option.
"""

from __future__ import annotations

import re
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from renio_pl.cli import RenioArgumentParser, RenioCLI, run_cli
from renio_pl.errors import ConfigError
from renio_pl.offline.datamodule import TraceDataModule, trace_stage
from renio_pl.offline.module import OfflineDistillationModule

__all__ = ["OfflineArgumentParser", "OfflineCLI", "main"]

# Options of on-policy distillation (`renio-pl`) that offline distillation does not have.
_ON_POLICY_OPTIONS = re.compile(
    r"model\.(teacher|weighter|loss)\b|data\.(sampling|prompts_per_epoch|solution_field|teacher_prompt_format)\b"
)
# `data.stage`, set from `model.objective` by the link (jsonargparse names the link in its error).
_STAGE_OPTION = re.compile(r"--> data\.stage\b")
_STAGE_FROM_OBJECTIVE = (
    "data.stage is set from model.objective (SFTLoss: sft, REDILoss: redi); remove data.stage and choose the "
    "objective, e.g. --model.objective REDILoss"
)


class OfflineArgumentParser(RenioArgumentParser):
    """`renio-pl`'s one-line errors, saying why an on-policy option or `data.stage` is refused."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if _STAGE_OPTION.search(message):
            message = _STAGE_FROM_OBJECTIVE
        elif _ON_POLICY_OPTIONS.search(message):
            message = (
                f"{message.strip()}; REDI learns from fixed teacher traces, so it takes no teacher model, weighter "
                "or token loss, and samples nothing to train on (model.objective is SFTLoss or REDILoss)"
            )
        return super().error(message, ex)


class OfflineCLI(RenioCLI):
    """`RenioCLI` with `data.stage` derived from the instantiated `model.objective` (`trace_stage`)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("model.objective", "data.stage", compute_fn=trace_stage, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Refuse a `data.stage` given in a config file (the link would silently override it)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("data.stage") is not None:
            raise ConfigError(_STAGE_FROM_OBJECTIVE)


def main(args: list[str] | None = None) -> None:
    """Entry point of `renio-pl-redi`."""
    run_cli(OfflineDistillationModule, TraceDataModule, OfflineArgumentParser, args, cli_class=OfflineCLI)


if __name__ == "__main__":
    main()
