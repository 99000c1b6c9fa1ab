"""Offline distillation from teacher traces: REDI (Xu et al., 2025), stage 0 to stage 2.

1. `renio-pl-redi-traces` (`traces.py`): the teacher samples k completions per problem, the
   verifier grades them; every positive goes to `sft.jsonl`, one (positive, negative) pair per
   problem to `redi.jsonl`.
2. `renio-pl-redi fit` with `model.objective: SFTLoss`: supervised fine-tuning on the positives
   (the data module serves stage `sft`); `SaveStudent` writes the result as a model folder.
3. `renio-pl-redi fit` with `REDILoss` (stage `redi`: positive and negative), from that folder.
"""

from renio_pl.offline.datamodule import Trace, TraceBatch, TraceDataModule
from renio_pl.offline.export import SaveStudent
from renio_pl.offline.module import OfflineDistillationModule

__all__ = ["Trace", "TraceBatch", "TraceDataModule", "OfflineDistillationModule", "SaveStudent"]
