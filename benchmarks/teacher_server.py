"""Teacher scoring through a vLLM server against the in-process teacher, on the same machine.

    python benchmarks/teacher_server.py [--teacher FOLDER] [--url http://127.0.0.1:PORT] \
        [--rollouts 32] [--prompt-tokens 32] [--completion-tokens 128] [--top-k 20] [--repeats 3]

Without `--teacher` it builds a random-weight teacher of the demo's tokenizer and the tiny test
architecture (2 layers, hidden 64: overhead-bound, it shows the per-request cost, not a large
teacher's speed). Without `--url` it starts vLLM's OpenAI server on the teacher (127.0.0.1, a
free port, stopped at the end) and prints its start time. Then, per repeat, both paths score the
same random batch: the in-process one is the teacher's half of `score_tokens` (forward,
`log_softmax`, top-k), the server one is `ServerTeacher.score` (one HTTP request per 64
rollouts); it prints completion tokens scored per second, the median of the repeats, and the
largest difference between the two paths' sampled-token log-probs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from renio_pl.demo.task import make_tokenizer  # noqa: E402
from renio_pl.logprobs import completion_hidden_states  # noqa: E402
from renio_pl.models import load_tokenizer  # noqa: E402
from renio_pl.rollouts import Rollout, collate_rollouts  # noqa: E402
from renio_pl.teacher_server import ServerTeacher  # noqa: E402
from renio_pl.teacher_server_launch import launch_server, stop_server  # noqa: E402


def tiny_teacher(folder: Path) -> Path:
    tokenizer = make_tokenizer("0123456789+-=abcdefghijklmnopqrstuvwxyz ?\n", None)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        intermediate_size=128, num_hidden_layers=2, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_batch(vocabulary: int, pad: int, rollouts: int, prompt_tokens: int, completion_tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    draws = [
        Rollout(torch.randint(2, vocabulary, (prompt_tokens,), generator=generator).tolist(),
                torch.randint(2, vocabulary, (completion_tokens,), generator=generator).tolist(), i, 1.0)
        for i in range(rollouts)
    ]
    return collate_rollouts(draws, pad)


@torch.no_grad()
def in_process_scores(teacher, batch, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = completion_hidden_states(teacher, *batch.teacher_inputs())  # (B, T, H)
    logprobs = torch.log_softmax(teacher.get_output_embeddings()(hidden).float(), dim=-1)  # (B, T, V)
    logprobs.topk(top_k, dim=-1)
    return logprobs.gather(-1, batch.completion_ids[..., None]).squeeze(-1), batch.completion_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", help="teacher folder (default: a tiny random one)")
    parser.add_argument("--url", help="a running server on the teacher (default: start one)")
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        teacher_folder = Path(args.teacher) if args.teacher else tiny_teacher(Path(scratch) / "teacher")
        tokenizer = load_tokenizer(str(teacher_folder))
        process = None
        url = args.url
        if url is None:
            started = time.monotonic()
            length = args.prompt_tokens + args.completion_tokens + 8
            process, url = launch_server(str(teacher_folder), str(Path(scratch) / "server.log"), max_model_len=length)
            print(f"server start: {time.monotonic() - started:.1f} s")
        try:
            scorer = ServerTeacher(url, top_k=args.top_k)
            scorer.connect(tokenizer)
            teacher = AutoModelForCausalLM.from_pretrained(teacher_folder, dtype=torch.float32).eval()
            server_rates, local_rates, gaps = [], [], []
            for repeat in range(args.repeats + 1):  # the first is a warm-up
                batch = random_batch(len(tokenizer), tokenizer.pad_token_id, args.rollouts, args.prompt_tokens,
                                     args.completion_tokens, repeat)
                tokens = int(batch.completion_mask.sum())
                start = time.perf_counter()
                local, mask = in_process_scores(teacher, batch, args.top_k)
                local_s = time.perf_counter() - start
                start = time.perf_counter()
                served, _ = scorer.score(*batch.teacher_inputs(), batch.completion_mask, 1.0)
                server_s = time.perf_counter() - start
                if repeat:
                    local_rates.append(tokens / local_s)
                    server_rates.append(tokens / server_s)
                    gaps.append(float((served.sampled[mask] - local[mask]).abs().max()))
        finally:
            if process is not None:
                stop_server(process)
    print(f"batch: {args.rollouts} rollouts x ({args.prompt_tokens} prompt + {args.completion_tokens} completion) tokens, "
          f"top-k {args.top_k}, torch threads {torch.get_num_threads()}")
    print(f"in-process teacher: {statistics.median(local_rates):,.0f} completion tokens/s")
    print(f"server teacher:     {statistics.median(server_rates):,.0f} completion tokens/s")
    print(f"largest |server - in-process| sampled-token log-prob: {max(gaps):.2e}")


if __name__ == "__main__":
    main()
