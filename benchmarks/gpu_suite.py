"""Speed and memory of each OPD stage on one GPU, at Qwen3-1.7B (student) and Qwen3-8B (teacher) shapes.

The models are random-weight Qwen3s built from the real configurations (nothing is
downloaded); speed does not depend on the weights. Printed:

- student update: student forward, chunked scoring against precomputed teacher hidden states
  (`renio_pl.logprobs.score_tokens`, ForwardKL), batch loss, backward and AdamW step, at 32k
  tokens per micro-batch (32 rollouts x (128 prompt + 896 completion) tokens): tokens/s, MFU
  and peak memory; once as `DistillationModule` runs it, once with HF gradient checkpointing.
- teacher scoring: teacher forward and log-prob of each completion token (chunked), no grad.
- decode: the HF engine (`HFGenerator`, keyed sampling), ms per decoding step at batch 64 and
  256 (128-token prompts): (time for 65 new tokens - time for 1) / 64.
- OPD step: 8 prompts x 1,024 new tokens (the paper's per-GPU batch): the share of rollout,
  teacher scoring, weighting (ReNIO) and student update.

MFU = model FLOPs / time / peak: 6 (training) or 2 (forward) x (decoder weights x all tokens
+ output head x completion tokens), plus attention 12 (or 4) x layers x heads x head_dim x
sequence length per token (PaLM's formula, not halved for causality); recomputation is not
counted. Peak bf16 dense: H100 / H200 989 TFLOPS, A100 312 (or --peak-tflops).

    python benchmarks/gpu_suite.py            # on a CUDA GPU (about 80 GB needed)
    python benchmarks/gpu_suite.py --tiny     # tiny shapes, any device (CPU: a check that it runs)
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from renio_pl.demo.task import make_tokenizer
from renio_pl.logprobs import completion_hidden_states, score_tokens, token_logprobs
from renio_pl.losses import ForwardKL, weighted_loss
from renio_pl.rollouts import HFGenerator, Rollout, RolloutBatch, SamplingConfig, collate_rollouts
from renio_pl.weighters import ReNIOWeighter, WeighterInputs

COMMON = dict(head_dim=128, num_key_value_heads=8, vocab_size=151_936, max_position_embeddings=40_960,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6)
SHAPES = {  # from the models' config.json
    "Qwen3-1.7B": dict(COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "Qwen3-8B": dict(COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=False),
}
TINY_SHAPES = {
    "tiny student": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True),
    "tiny teacher": dict(vocab_size=1024, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


@dataclass
class Sizes:
    """Batch shapes: (rollouts, prompt tokens, completion tokens) per stage."""

    update: tuple[int, int, int] = (32, 128, 896)  # 32,768 tokens per micro-batch
    decode_batches: tuple[int, ...] = (64, 256)
    decode_prompt: int = 128
    decode_steps: int = 64
    step: tuple[int, int, int] = (8, 256, 1024)
    chunk_tokens: int = 2048


TINY_SIZES = Sizes(update=(4, 16, 48), decode_batches=(4, 16), decode_prompt=8, decode_steps=8, step=(4, 8, 16),
                   chunk_tokens=64)


def build(shape: dict, dtype: torch.dtype, device: torch.device, seed: int) -> Qwen3ForCausalLM:
    """A random-weight Qwen3 of `shape`, created on `device` in `dtype`."""
    torch.manual_seed(seed)
    config = Qwen3Config(**shape, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def flops_per_token(config: Qwen3Config, sequence: int, completion_share: float, factor: int) -> float:
    """Model FLOPs per token: `factor` 6 (training) or 2 (forward), PaLM's formula (see the module doc).

    The output head counts on the completion tokens only (`completion_share` of the tokens);
    the input embedding is a lookup, no FLOPs.
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i  # attention projections and the gated MLP
    head = config.vocab_size * h
    return factor * (layers * per_layer + head * completion_share) + 2 * factor * layers * q * sequence


def random_prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(2, vocab, (count, length), generator=generator).tolist()


def random_batch(rollouts: int, prompt: int, completion: int, vocab: int, device: torch.device) -> RolloutBatch:
    """Rollouts of random tokens, every completion token generated."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (rollouts, prompt + completion), generator=generator).tolist()
    batch = collate_rollouts([Rollout(row[:prompt], row[prompt:], i, 1.0) for i, row in enumerate(ids)], 0)
    return _to(batch, device)


def _to(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    for name in ("input_ids", "attention_mask", "completion_ids", "completion_mask"):
        setattr(batch, name, getattr(batch, name).to(device))
    return batch


class Clock:
    """Wall time and peak memory of a block, synchronised with the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, result: dict):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        result["seconds"] = time.perf_counter() - start
        if self.device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30


def teacher_hidden(teacher, batch: RolloutBatch) -> torch.Tensor:
    """(B, T, H_T) teacher hidden states of the completion tokens, no grad."""
    with torch.no_grad():
        return completion_hidden_states(teacher, batch.input_ids, batch.attention_mask, batch.prompt_length)


def teacher_scoring(teacher, batch: RolloutBatch, chunk: int) -> torch.Tensor:
    """(B, T) teacher log-prob of each completion token: forward, then the head `chunk` positions at a time."""
    with torch.no_grad():
        return token_logprobs(teacher_hidden(teacher, batch), teacher.lm_head, batch.completion_ids,
                              batch.completion_mask, chunk)


def student_update(student, teacher, batch: RolloutBatch, hidden_t: torch.Tensor, optimizer, chunk: int, weights=None):
    """One update as `DistillationModule.training_step` makes it (`weights` (B,), default all 1)."""
    hidden_s = completion_hidden_states(student, batch.input_ids, batch.attention_mask, batch.prompt_length)
    scores = score_tokens(hidden_s, student.lm_head, hidden_t, teacher.lm_head, batch.completion_ids,
                          batch.completion_mask, batch.temperature, ForwardKL(), chunk)
    if weights is None:
        weights = torch.ones(batch.completion_mask.shape[0], device=hidden_s.device)
    weighted_loss(scores.token_loss, batch.completion_mask, weights).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(clock: Clock, repeats: int, work) -> dict:
    """Mean seconds (and peak memory) of `work()` over `repeats` runs after one warm-up; OOM reported."""
    results = []
    try:
        for _ in range(repeats + 1):
            result = {}
            with clock(result):
                work()
            results.append(result)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True}
    runs = results[1:]
    summary = {"seconds": sum(r["seconds"] for r in runs) / len(runs)}
    if "peak_gib" in runs[0]:
        summary["peak_gib"] = max(r["peak_gib"] for r in runs)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: checks that the suite runs (any device)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes, sizes = (TINY_SHAPES, TINY_SIZES) if args.tiny else (SHAPES, Sizes())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    (student_name, student_shape), (teacher_name, teacher_shape) = shapes.items()
    student = build(student_shape, dtype, device, 0).train()
    teacher = build(teacher_shape, dtype, device, 1).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    clock = Clock(device)
    print(f"device {name} ({'peak ' + str(peak) + ' TFLOPS' if peak else 'no peak known: MFU -'}), {dtype}, "
          f"torch {torch.__version__}, random weights")
    print(f"student {student_name}: {sum(p.numel() for p in student.parameters()) / 1e6:,.1f}M parameters; "
          f"teacher {teacher_name}: {sum(p.numel() for p in teacher.parameters()) / 1e6:,.1f}M")
    rows = {}

    def throughput(result: dict, config, factor: int, shape: tuple[int, int, int]) -> dict:
        """Adds tokens, tokens/s and MFU to a timed result (FLOPs per token: `flops_per_token`)."""
        rollouts, prompt, completion = shape
        tokens = rollouts * (prompt + completion)
        if result.get("oom"):
            return result
        result["tokens_per_s"] = tokens / result["seconds"]
        flops = tokens * flops_per_token(config, prompt + completion, completion / (prompt + completion), factor)
        result["mfu"] = flops / result["seconds"] / (peak * 1e12) if peak else None
        result["tokens"] = tokens
        return result

    batch = random_batch(*sizes.update, student.config.vocab_size, device)
    hidden_t = teacher_hidden(teacher, batch)
    update = partial(student_update, student, teacher, batch, hidden_t, optimizer, sizes.chunk_tokens)
    rows["student update"] = throughput(timed(clock, args.repeats, update), student.config, 6, sizes.update)
    optimizer.zero_grad(set_to_none=True)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows["student update, grad ckpt"] = throughput(timed(clock, args.repeats, update), student.config, 6, sizes.update)
    student.gradient_checkpointing_disable()
    optimizer.zero_grad(set_to_none=True)  # gradients left by an update that ran out of memory
    del update, hidden_t
    scoring = partial(teacher_scoring, teacher, batch, sizes.chunk_tokens)
    rows["teacher scoring"] = throughput(timed(clock, args.repeats, scoring), teacher.config, 2, sizes.update)
    del scoring, batch

    tokenizer, engine = make_tokenizer("0123456789"), HFGenerator(batch_size=max(sizes.decode_batches))
    for size in sizes.decode_batches:
        prompts = random_prompts(size, sizes.decode_prompt, student.config.vocab_size)
        short, long = (
            timed(clock, 1, partial(engine.generate, student, tokenizer, prompts,
                                    SamplingConfig(temperature=1.0, max_new_tokens=steps), list(range(size))))
            for steps in (1, sizes.decode_steps + 1)
        )
        if not (short.get("oom") or long.get("oom")):
            long["ms_per_step"] = 1000 * (long["seconds"] - short["seconds"]) / sizes.decode_steps
        rows[f"decode batch {size}"] = long

    rows["OPD step"] = opd_step(student, teacher, optimizer, tokenizer, engine, sizes, clock)
    report(rows)


def opd_step(student, teacher, optimizer, tokenizer, engine, sizes: Sizes, clock: Clock) -> dict:
    """Seconds of each stage of one on-policy step: rollout, teacher scoring, weighting, student update."""
    prompts, prompt_tokens, new_tokens = sizes.step
    prompt_ids = random_prompts(prompts, prompt_tokens, student.config.vocab_size)
    stages: dict[str, dict] = {name: {} for name in ("rollout", "teacher scoring", "weighting", "student update")}
    try:
        with clock(stages["rollout"]):
            completions = engine.generate(student, tokenizer, prompt_ids, SamplingConfig(max_new_tokens=new_tokens),
                                          list(range(prompts)))
        rollouts = [Rollout(p, c[0], i, 1.0) for i, (p, c) in enumerate(zip(prompt_ids, completions))]
        batch = _to(collate_rollouts(rollouts, tokenizer.pad_token_id), next(student.parameters()).device)
        with clock(stages["teacher scoring"]):
            hidden_t = teacher_hidden(teacher, batch)
        with torch.no_grad():  # the weighter reads log-probs that scoring computes; here from a no-grad pass
            hidden_s = completion_hidden_states(student, batch.input_ids, batch.attention_mask, batch.prompt_length)
            scores = score_tokens(hidden_s, student.lm_head, hidden_t, teacher.lm_head, batch.completion_ids,
                                  batch.completion_mask, 1.0, ForwardKL(), sizes.chunk_tokens)
        with clock(stages["weighting"]):
            weights = ReNIOWeighter()(WeighterInputs(scores.student_logprobs, scores.teacher_logprobs,
                                                      batch.completion_mask))
        with clock(stages["student update"]):
            student_update(student, teacher, batch, hidden_t, optimizer, sizes.chunk_tokens, weights)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True}
    return {name: stage["seconds"] for name, stage in stages.items()}


def report(rows: dict[str, dict]) -> None:
    print(f"{'stage':<28} {'tokens':>8} {'seconds':>9} {'tokens/s':>11} {'MFU':>6} {'peak GiB':>9} {'ms/step':>8}")
    for name, row in rows.items():
        if name == "OPD step":
            continue
        if row.get("oom"):
            print(f"{name:<28} {'out of memory':>30}")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"
        peak = f"{row['peak_gib']:.1f}" if "peak_gib" in row else "-"
        tokens = row.get("tokens", "-")
        speed = f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else "-"
        step = f"{row['ms_per_step']:.1f}" if "ms_per_step" in row else "-"
        print(f"{name:<28} {tokens:>8} {row['seconds']:>9.3f} {speed:>11} {mfu:>6} {peak:>9} {step:>8}")
    step = rows["OPD step"]
    if step.get("oom"):
        print("OPD step: out of memory")
    else:
        total = sum(step.values())
        shares = ", ".join(f"{name} {100 * seconds / total:.1f}%" for name, seconds in step.items())
        print(f"OPD step {total:.3f} s: {shares}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
