"""FSDP2 for the student, applied by `DistillationModule.configure_model` under `ModelParallelStrategy`.

The student is split into FSDP groups over the data-parallel mesh: one per decoder layer;
one for the rest of its weights (embeddings, final norm and output head together, so a head
tied to the embedding stays one parameter); and the student itself, the root, which owns no
weights of its own. Scoring (`renio_pl.logprobs`) runs the decoder once and the output head
on `chunk_tokens` positions at a time, never the student's `forward`; FSDP2 allows a group
whose modules run apart like this. Its root, though, is fixed by the first forward: one
forward of the whole student on a single token makes it the student, so either scoring or
generation may come first (a run resumed mid-round scores before it generates).

Sampling through the sharded student gathers each group at every decoding step, a collective:
the student is marked as FSDP-managed for `transformers`, whose `generate` then runs with
`synced_gpus` and keeps a process whose sequences have all ended decoding (its output unused)
until every process's have, instead of leaving the others waiting in their all-gathers.

Every process must also enter the sharded student the same number of times. The loops that
run it a data-dependent number of times per process (a `generate` call per chunk of prompts,
the output head per chunk of scored tokens) take their chunks from `lockstep_slices`, which
pads the process with fewer chunks with empty ones up to the most any process has.

The teacher is not sharded. It is not a child of the module, so each process holds a full
frozen copy, outside the optimizer and the checkpoint, as under DDP.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from renio_pl.errors import ConfigError

__all__ = ["lockstep_slices", "runs_collectives", "shard_student"]


def shard_student(student: torch.nn.Module, device_mesh: DeviceMesh) -> None:
    """Apply FSDP2 in place to a causal LM (plain or peft); a student already sharded is left as it is.

    Args:
        student: a `transformers` causal LM whose decoder keeps its blocks in `layers`.
        device_mesh: `ModelParallelStrategy`'s mesh; its `tensor_parallel` size must be 1.
    """
    if isinstance(student, FSDPModule):  # configure_model runs again for each stage of a process
        return
    tensor_parallel = device_mesh["tensor_parallel"].size()
    if tensor_parallel != 1:
        raise ConfigError(
            f"trainer.strategy.init_args.tensor_parallel_size must be 1 (renio-pl shards the student with FSDP2 "
            f"only); got {tensor_parallel}: set data_parallel_size to the number of processes"
        )
    decoder = student.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(
            f"FSDP needs the student's decoder blocks in `layers` (a ModuleList); {type(decoder).__name__} has "
            "none: use trainer.strategy=ddp"
        )
    mesh = device_mesh["data_parallel"]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard([decoder, student.get_output_embeddings()], mesh=mesh)
    fully_shard(student, mesh=mesh)
    for model in {student, getattr(student, "get_base_model", lambda: student)()}:
        model._is_fsdp_managed_module = True  # transformers' `generate`: synced_gpus under FSDP2
    device = next(student.parameters()).device
    with torch.no_grad():
        student(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))


def runs_collectives(model: torch.nn.Module) -> bool:
    """Whether a forward of `model` is a collective: it is FSDP-managed and several processes run.

    `model` is the student `shard_student` sharded (or its output head, in a sharded group), or
    any other module: the frozen teacher and a DDP student compute alone. The answer is the same
    on every process, which all run the same strategy.
    """
    sharded = isinstance(model, FSDPModule) or getattr(model, "_is_fsdp_managed_module", False)
    return bool(sharded) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lockstep_slices(total: int, size: int, model: torch.nn.Module) -> list[slice]:
    """`range(total)` cut into chunks of at most `size`, as many chunks on every process when `model` needs it.

    A loop that runs `model` once per chunk must, under FSDP, run it equally often on every
    process: each run gathers the model's weights, and a process with one chunk more than the
    others would wait in that gather for good. When `runs_collectives(model)`, the processes
    agree on the most chunks any of them has (one `all_reduce` of a single integer), and a process
    with fewer gets empty chunks, `slice(total, total)`, after its own: it runs the model on
    nothing (or on a throwaway input) and discards the result. Otherwise there is no communication.
    The count travels as a (1,) int64 tensor on the model's device over the default process
    group, which FSDP's data-parallel mesh spans (`tensor_parallel_size` is 1).

    Args:
        total: items on this process (prompts, scored tokens); may be 0.
        size: the most items in a chunk (>= 1).
        model: the module the loop runs per chunk.
    Returns:
        `ceil(total / size)` slices `[start, min(start + size, total))` in order, then the empty
        slices, if any.
    """
    count = math.ceil(total / size)
    slices = [slice(start, min(start + size, total)) for start in range(0, total, size)]
    if not runs_collectives(model):
        return slices
    device = next(model.parameters()).device
    most = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return slices + [slice(total, total)] * (int(most.item()) - count)
