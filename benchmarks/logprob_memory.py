"""Peak memory of scoring a batch (forward + backward): chunked log-probs against full HF logits.

Each setting runs in a fresh process on CPU with random Qwen3s of Qwen3's real vocabulary
(V = 151,936) and a tiny body (1 layer, hidden 64), so the vocabulary dominates memory, as
it does for real students at long completions. One step is: student and teacher forward,
ForwardKL over the full vocabulary on every completion token, the batch loss, backward.

- `chunked`: what `DistillationModule.score` runs: decoder hidden states, then
  `renio_pl.logprobs.score_tokens`, `chunk` positions at a time under activation checkpointing.
- `full`: the plain HF path: `model(...).logits` for the completion positions
  (`logits_to_keep`), `log_softmax` of the whole `(B, T, V)` tensor, the same loss.

"peak" is the process's peak resident memory during the step above its resident memory just
before it (Linux `VmHWM`, reset through `/proc/self/clear_refs`), with glibc's malloc told to
map every block of 64 KiB or more on its own (`MALLOC_MMAP_THRESHOLD_=65536`), so that a freed
tensor goes back to the system at once: by default glibc keeps freed blocks below 32 MiB in
its heap, and the peak then grows with the number of chunks although the live tensors do not.
"logits" is the size of one float32 `(B, T, V)` tensor, `B * T * V * 4` bytes.

    python benchmarks/logprob_memory.py            # the table the README quotes
    python benchmarks/logprob_memory.py --quick    # two small settings (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from renio_pl.logprobs import completion_hidden_states, position_ids, score_tokens
from renio_pl.losses import ForwardKL, weighted_loss

VOCAB = 151_936  # Qwen3's
BATCH, PROMPT = 8, 16  # B rollouts, P prompt tokens each
CHUNKED = [("chunked", tokens, chunk) for tokens in (1024, 4096) for chunk in (128, 512)]
FULL = [("full", 512, 0), ("full", 1024, 0)]
QUICK = [("chunked", 1024, 16), ("full", 256, 0)]


def tiny_qwen3(seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         intermediate_size=128, num_hidden_layers=1, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    return Qwen3ForCausalLM(config)


def chunked_step(student, teacher, input_ids, attention_mask, mask, chunk: int) -> torch.Tensor:
    """The batch loss as `DistillationModule.score` computes it; () float32."""
    student_hidden = completion_hidden_states(student, input_ids, attention_mask, PROMPT)  # (B, T, H)
    with torch.no_grad():
        teacher_hidden = completion_hidden_states(teacher, input_ids, attention_mask, PROMPT)  # (B, T, H)
    scores = score_tokens(student_hidden, student.lm_head, teacher_hidden, teacher.lm_head, input_ids[:, PROMPT:],
                          mask, 1.0, ForwardKL(), chunk)
    return weighted_loss(scores.token_loss, mask, torch.ones(mask.shape[0]))


def full_step(student, teacher, input_ids, attention_mask, mask) -> torch.Tensor:
    """The same loss from whole `(B, T, V)` logits; () float32."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                  logits_to_keep=mask.shape[1] + 1)
    student_logprobs = torch.log_softmax(student(**kwargs).logits[:, :-1].float(), dim=-1)  # (B, T, V)
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(teacher(**kwargs).logits[:, :-1].float(), dim=-1)  # (B, T, V)
    targets = input_ids[:, PROMPT:]
    token_loss = ForwardKL()(student_logprobs[mask], teacher_logprobs[mask], targets[mask])  # (N,)
    return weighted_loss(torch.zeros(mask.shape).masked_scatter(mask, token_loss), mask, torch.ones(mask.shape[0]))


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(path: str, tokens: int, chunk: int) -> dict:
    """One step in this process: peak memory above the start (bytes) and seconds."""
    student, teacher = tiny_qwen3(0).train(), tiny_qwen3(1).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, VOCAB, (BATCH, PROMPT + tokens // BATCH), generator=generator)  # (B, P + T)
    attention_mask = torch.ones_like(input_ids)
    mask = torch.ones(BATCH, tokens // BATCH, dtype=torch.bool)  # (B, T): every completion token generated
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    start = _status_kib("VmRSS")
    began = time.perf_counter()
    if path == "chunked":
        loss = chunked_step(student, teacher, input_ids, attention_mask, mask, chunk)
    else:
        loss = full_step(student, teacher, input_ids, attention_mask, mask)
    loss.backward()
    seconds = time.perf_counter() - began
    peak = _status_kib("VmHWM")
    return {"path": path, "tokens": tokens, "chunk": chunk, "peak_bytes": (peak - start) * 1024,
            "logits_bytes": tokens * VOCAB * 4, "seconds": seconds, "loss": loss.item()}


def run(settings: list[tuple[str, int, int]]) -> list[dict]:
    """Each setting in its own process (a fresh peak, freed tensors returned to the system at once)."""
    results = []
    for path, tokens, chunk in settings:
        done = subprocess.run([sys.executable, __file__, "--one", path, str(tokens), str(chunk)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small settings only")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "TOKENS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, tokens, chunk = args.one
        print(json.dumps(measure(path, int(tokens), int(chunk))))
        return
    results = run(QUICK if args.quick else CHUNKED + FULL)
    print(f"V = {VOCAB}, B = {BATCH}, ForwardKL, float32, CPU, torch threads {torch.get_num_threads()}")
    print(f"{'path':<8} {'B*T':>6} {'chunk':>6} {'logits GB':>10} {'peak GB':>8} {'peak/logits':>12} {'s':>7}")
    for r in results:
        chunk = r["chunk"] if r["path"] == "chunked" else "-"
        print(f"{r['path']:<8} {r['tokens']:>6} {chunk:>6} {r['logits_bytes'] / 1e9:>10.3f} {r['peak_bytes'] / 1e9:>8.3f}"
              f" {r['peak_bytes'] / r['logits_bytes']:>12.2f} {r['seconds']:>7.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
