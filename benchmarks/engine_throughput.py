"""Rollout throughput of the HF and vLLM engines on the same prompts, and vLLM's weight-sync time.

Each engine samples the same round (same prompts, `n`, temperature, `max_new_tokens`) with the
same student; one untimed warm-up round, then `--repeats` timed rounds. The vLLM engine pushes
the student's weights into itself at the start of every round: that sync is timed on its own
and left out of its sampling time. Figures are for this machine only (tiny models are
overhead-bound: they show correctness of the setup, not GPU speed).

    python benchmarks/engine_throughput.py                       # the demo student (built if missing)
    python benchmarks/engine_throughput.py --model models/smollm2-135m-instruct \\
        --prompts evaluation/data/math/gsm8k_test.jsonl --prompt-field question --count 16 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from renio_pl.demo.task import build_assets  # noqa: E402
from renio_pl.models import load_model, load_tokenizer  # noqa: E402
from renio_pl.prompt_format import PromptFormat, render_prompt  # noqa: E402
from renio_pl.prompts import load_rows  # noqa: E402
from renio_pl.rollouts import HFGenerator, RolloutGenerator, SamplingConfig  # noqa: E402


def time_engine(name: str, engine: RolloutGenerator, model, tokenizer, prompts, sampling, repeats: int) -> dict:
    seeds = list(range(len(prompts)))
    engine.generate(model, tokenizer, prompts, sampling, seeds)  # warm-up (and vLLM's engine start)
    seconds, syncs, tokens = [], [], 0
    for repeat in range(repeats):
        start = time.perf_counter()
        completions = engine.generate(model, tokenizer, prompts, sampling, [s + 1000 * (repeat + 1) for s in seeds])
        elapsed = time.perf_counter() - start
        sync = getattr(engine, "last_sync_seconds", None) or 0.0
        seconds.append(elapsed - sync)
        syncs.append(sync)
        tokens += sum(len(c) for group in completions for c in group)
    sampling_s = statistics.mean(seconds)
    return {
        "engine": name,
        "round_s": sampling_s,
        "tokens_per_s": tokens / sum(seconds),
        "completions_per_s": len(prompts) * sampling.n / sampling_s,
        "sync_s": statistics.mean(syncs) if name == "vllm" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="student folder (default: the demo student)")
    parser.add_argument("--prompts", help="jsonl of prompts (default: the demo's held-out prompts)")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--count", type=int, default=128, help="prompts per round")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--hf-batch-size", type=int, default=256, help="HF engine: prompts per generate call")
    args = parser.parse_args()
    if args.model is None:
        assets = build_assets("demo_assets")
        args.model, args.prompts = str(assets / "student"), args.prompts or str(assets / "heldout.jsonl")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    rows = load_rows(args.prompts, args.prompt_field, None)[: args.count]
    prompts = [render_prompt(tokenizer, row.problem, PromptFormat()) for row in rows]
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    results = []
    for name in args.engines:
        if name == "hf":
            engine = HFGenerator(batch_size=args.hf_batch_size)
        else:
            from renio_pl.vllm_engine import VLLMGenerator

            engine = VLLMGenerator(max_model_len=min(4096, model.config.max_position_embeddings), kv_cache_gib=1.0,
                                   enforce_eager=True)
        results.append(time_engine(name, engine, model, tokenizer, prompts, sampling, args.repeats))
    print(f"\nmodel {args.model}: {len(prompts)} prompts x {args.n} samples, max_new_tokens {args.max_new_tokens}, "
          f"temperature {args.temperature}, mean of {args.repeats} rounds after a warm-up")
    print(f"{'engine':<8}{'round s':>10}{'tokens/s':>12}{'completions/s':>16}{'weight sync s':>16}")
    for r in results:
        sync = "-" if r["sync_s"] is None else f"{r['sync_s']:.3f}"
        print(f"{r['engine']:<8}{r['round_s']:>10.3f}{r['tokens_per_s']:>12.1f}{r['completions_per_s']:>16.1f}{sync:>16}")


if __name__ == "__main__":
    main()
