"""The server side of `renio_pl.teacher_server`: a tempered copy of the teacher, and a vLLM server to serve it.

`write_tempered_teacher` writes a copy of the teacher whose output head is divided by the
rollout temperature `T`, so that the log-probs vLLM returns (always at temperature 1) are the
teacher's at `T`; it records `T` in the copy's `config.json` (`TEMPERATURE_KEY`). `main` is the
command `python -m renio_pl.teacher_server temper <teacher> <out> --temperature T`.

`launch_server` / `stop_server` start and stop vLLM's OpenAI-compatible server in its own
process group, for the tests and the benchmark; users start their own with `vllm serve`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch

from renio_pl.errors import ConfigError

__all__ = ["write_tempered_teacher", "TEMPERATURE_KEY", "launch_server", "stop_server"]

TEMPERATURE_KEY = "renio_logit_temperature"  # config.json key of a copy written by write_tempered_teacher


def write_tempered_teacher(teacher: str, out: str, temperature: float, dtype: str = "float32") -> None:
    """Write a copy of `teacher` whose log-probs at temperature 1 are the teacher's at `temperature`.

    The output head is untied from the input embeddings and divided by `temperature` (its bias
    too, if any): `log_softmax((W h + b) / T)`. The tokenizer is copied alongside; `config.json`
    records `T` under `renio_logit_temperature`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if temperature <= 0:
        raise ConfigError(f"--temperature must be > 0; got {temperature}")
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=getattr(torch, dtype))
    head = model.get_output_embeddings()
    with torch.no_grad():
        weight = head.weight.detach().clone() / temperature
        head.weight = torch.nn.Parameter(weight)
        if getattr(head, "bias", None) is not None:
            head.bias = torch.nn.Parameter(head.bias.detach().clone() / temperature)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    setattr(model.config, TEMPERATURE_KEY, temperature)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_server(
    model: str, log_path: str, port: int | None = None, max_model_len: int = 2048, dtype: str = "float32",
    start_timeout_s: float = 300.0, kill_after_s: float = 3600.0, extra_args: tuple[str, ...] = (),
) -> tuple[subprocess.Popen, str]:
    """Start vLLM's OpenAI-compatible server on 127.0.0.1 serving `model` (named `teacher`), and wait until it answers.

    It runs in its own process group (stop it with `stop_server`) under `timeout -s KILL
    kill_after_s`, with `VLLM_CPU_KVCACHE_SPACE=1` (GiB) unless set. Used by the tests and the
    benchmark; users start their own with `vllm serve`.

    Returns:
        (process, url), url like `http://127.0.0.1:PORT`.
    """
    port = port or free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = [
        "timeout", "-s", "KILL", str(int(kill_after_s)), sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--enforce-eager",
        "--max-model-len", str(max_model_len), "--served-model-name", "teacher", *extra_args,
    ]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout_s
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({process.returncode}); its log: {log_path}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                return process, url
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the vLLM server did not answer within {start_timeout_s}s; its log: {log_path}")
                time.sleep(1)
    except BaseException:
        stop_server(process)
        raise


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 20 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m renio_pl.teacher_server")
    commands = parser.add_subparsers(dest="command", required=True)
    temper = commands.add_parser("temper", help="write a copy of the teacher whose log-probs are at a temperature")
    temper.add_argument("teacher", help="the teacher's local folder or hub id")
    temper.add_argument("out", help="folder to write the copy to (serve it with `vllm serve <out>`)")
    temper.add_argument("--temperature", type=float, required=True, help="the rollouts' sampling temperature")
    temper.add_argument("--dtype", default="float32", help="dtype of the written weights (default float32)")
    args = parser.parse_args(argv)
    try:
        write_tempered_teacher(args.teacher, args.out, args.temperature, args.dtype)
    except (ConfigError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out}: serve it with `vllm serve {args.out}` and set model.teacher_server.served_temperature "
          f"{args.temperature}")
