"""`renio-pl-redi fit|validate|test|predict`: `renio-pl` over OfflineDistillationModule and TraceDataModule.

The same LightningCLI as `renio-pl` (`model.student` linked to `data.tokenizer`, one-line
errors with exit status 2, a diverged run with status 1); only the two classes differ, since
`renio-pl` fixes DistillationModule and OnPolicyDataModule (it is not in subclass mode).
"""

from __future__ import annotations

import re
from typing import NoReturn

from renio_pl.cli import RenioArgumentParser, run_cli
from renio_pl.offline.datamodule import TraceDataModule
from renio_pl.offline.module import OfflineDistillationModule

__all__ = ["OfflineArgumentParser", "main"]

# Options of on-policy distillation (`renio-pl`) that offline distillation does not have.
_ON_POLICY_OPTIONS = re.compile(
    r"model\.(teacher|weighter|loss)\b|data\.(sampling|prompts_per_epoch|solution_field|teacher_prompt_format)\b"
)


class OfflineArgumentParser(RenioArgumentParser):
    """`renio-pl`'s one-line errors, saying why an on-policy option is refused."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if _ON_POLICY_OPTIONS.search(message):
            message = (
                f"{message.strip()}; REDI learns from fixed teacher traces, so it takes no teacher model, weighter "
                "or token loss, and samples nothing to train on (model.objective is SFTLoss or REDILoss)"
            )
        return super().error(message, ex)


def main(args: list[str] | None = None) -> None:
    """Entry point of `renio-pl-redi`."""
    run_cli(OfflineDistillationModule, TraceDataModule, OfflineArgumentParser, args)


if __name__ == "__main__":
    main()
