"""ServerTeacher: the teacher's log-probs from a running vLLM server (its OpenAI-compatible API).

Stage 3 of the data flow for a teacher too large to sit beside the student: instead of a
forward pass in the training process, each batch's teacher prompts plus completions are sent,
as token ids, to `POST /v1/completions` with `prompt_logprobs = top_k` (and one generated
token, discarded). vLLM answers, for every prompt position, the log-prob of the token that is
there and of its `top_k` most likely tokens; the completion positions become a `TeacherTopK`
(sampled `(B, T)`, top-k ids and log-probs `(B, T, k)`), which the top-k losses and every
weighter read exactly as they read the in-process teacher's.

Temperature: vLLM computes prompt log-probs at temperature 1 whatever the request's
temperature. The exact route is to serve a copy of the teacher whose output head is divided
by the rollout temperature `T` (untied from the input embeddings): `log_softmax(W h / T)` is
then what the server returns. `renio_pl.teacher_server_launch.write_tempered_teacher` (the
command `python -m renio_pl.teacher_server temper ...`) writes that copy and records `T` in its
`config.json` (`renio_logit_temperature`); the scorer refuses batches sampled at another
temperature than `served_temperature`.

Failures: a server that does not answer at the start is refused in one line naming the URL;
one that stops answering mid-run is retried `retries` times, `retry_wait_s` apart (doubling),
then `TeacherServerDown` is raised (the module turns it into a clean stop naming the last good
checkpoint); a teacher whose tokenizer differs from the student's is refused at the start
(probe text tokenised and sampled ids detokenised through the server's `/tokenize` and
`/detokenize`); a request longer than the server's `max_model_len` is refused or its rollout
left out of the loss (`too_long`).

The server side (writing the tempered copy, starting and stopping a server for the tests and
the benchmark, the `temper` command) is `renio_pl.teacher_server_launch`.

Shapes use the package glossary (`renio_pl/__init__.py`): `B` rollouts, `T` completion tokens, `k` top-k width, `V` vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from typing import Any

import torch
from torch import Tensor

from renio_pl.errors import ConfigError
from renio_pl.losses import TEACHER_LOGPROB_FLOOR, TeacherTopK

__all__ = ["ServerTeacher", "TeacherServerDown"]

log = logging.getLogger(__name__)

TOO_LONG = ("refuse", "skip")
PROBE_TEXT = "Solve 12 * (3 + 4) = ?  Answer: 84.\nÜber naïve café — 東京 🙂 <think>\tx_1^2</think>"


class TeacherServerDown(RuntimeError):
    """The teacher server stopped answering and the retries ran out."""


class ServerTeacher:
    """A teacher behind a vLLM server, asked for the sampled-token and top-k log-probs of each completion token.

    Start the server on the teacher (or its tempered copy) with `vllm serve <folder>`; the
    scorer only reads from it, never changes it.

    Args:
        url: the server's base address, e.g. `http://127.0.0.1:8000` (no `/v1`).
        top_k: the teacher's most likely tokens returned per position (at least the loss's
            `top_k`; 0 for losses that read the sampled token only, e.g. `SampledReverseKL`).
        served_temperature: the temperature the served model's log-probs are at: 1 for the
            teacher itself, `T` for a copy written by `write_tempered_teacher(T)`. Batches
            sampled at another temperature are refused.
        model: the served model's name (default: the only one the server lists).
        timeout_s: seconds one request may take.
        retries: further tries of a failed request before `TeacherServerDown`.
        retry_wait_s: wait before the first retry; doubled before each next one.
        too_long: a teacher prompt plus completion longer than the server's `max_model_len`:
            `refuse` (stop with a one-line error) or `skip` (leave that rollout out of the loss,
            counted in `teacher/skipped_rollouts`).
        rows_per_request: rollouts sent in one request.
    """

    def __init__(
        self,
        url: str,
        top_k: int = 0,
        served_temperature: float = 1.0,
        model: str | None = None,
        timeout_s: float = 600.0,
        retries: int = 3,
        retry_wait_s: float = 2.0,
        too_long: str = "refuse",
        rows_per_request: int = 64,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"model.teacher_server.url must start with http:// or https://; got {url!r}")
        if top_k < 0:
            raise ConfigError(f"model.teacher_server.top_k must be >= 0; got {top_k}")
        if served_temperature <= 0:
            raise ConfigError(f"model.teacher_server.served_temperature must be > 0; got {served_temperature}")
        if retries < 0 or retry_wait_s < 0 or timeout_s <= 0 or rows_per_request < 1:
            raise ConfigError(
                "model.teacher_server: retries and retry_wait_s must be >= 0, timeout_s > 0, rows_per_request >= 1"
            )
        if too_long not in TOO_LONG:
            raise ConfigError(f"model.teacher_server.too_long must be refuse or skip; got {too_long!r}")
        self.url = url.rstrip("/")
        self.top_k = top_k
        self.served_temperature = served_temperature
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.too_long = too_long
        self.rows_per_request = rows_per_request
        self.max_model_len: int | None = None
        self.vocabulary: int | None = None

    # --- HTTP ------------------------------------------------------------------------------
    def _request(self, path: str, payload: dict | None = None, retries: int | None = None) -> Any:
        """JSON of `GET` (no payload) or `POST` to `url + path`; retried on connection errors and 5xx."""
        retries = self.retries if retries is None else retries
        data = None if payload is None else json.dumps(payload).encode()
        wait = self.retry_wait_s
        for attempt in range(retries + 1):
            request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                if error.code < 500:  # the server answered: our request is wrong, retrying will not help
                    detail = error.read().decode(errors="replace")[:300]
                    raise ConfigError(f"the teacher server at {self.url} refused {path}: HTTP {error.code} {detail}")
                failure: Exception = error
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
                failure = error
            if attempt < retries:
                log.warning("teacher server %s%s failed (%s); retry %d/%d in %.1fs", self.url, path, failure, attempt + 1,
                            retries, wait)
                time.sleep(wait)
                wait *= 2
        down = TeacherServerDown(f"the teacher server at {self.url} did not answer {path} after {retries + 1} tries ({failure})")
        down.reason = str(failure)
        raise down

    # --- start-up checks -------------------------------------------------------------------
    def connect(self, student_tokenizer, vocabulary: int | None = None) -> None:
        """Check, once at the start, that the server answers and serves a teacher with the student's tokenizer.

        Args:
            student_tokenizer: the student's tokenizer.
            vocabulary: the student's output vocabulary `V`; a teacher top-k id at or above it
                (a teacher with a larger padded vocabulary) is then refused in one line.

        Raises:
            ConfigError: server down (naming the URL), no or several models without `model`,
                a tokenizer that differs from the student's.
        """
        try:
            models = [entry["id"] for entry in self._request("/v1/models", retries=0)["data"]]
        except TeacherServerDown as error:
            raise ConfigError(
                f"model.teacher_server: no vLLM server answers at {self.url} ({error.reason}); start it "
                "with `vllm serve <teacher folder> --host 127.0.0.1 --port <port>` or fix the url"
            ) from None
        if self.model is None:
            if len(models) != 1:
                raise ConfigError(f"model.teacher_server: the server at {self.url} serves {models}; set model.teacher_server.model")
            self.model = models[0]
        elif self.model not in models:
            raise ConfigError(f"model.teacher_server.model {self.model!r} is not served at {self.url} (it serves {models})")
        self._check_tokenizer(student_tokenizer)
        self.vocabulary = vocabulary

    def _check_tokenizer(self, student_tokenizer) -> None:
        """Refuse a served teacher that tokenises a probe text, or decodes sampled ids, unlike the student."""
        answer = self._request("/tokenize", {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False})
        self.max_model_len = answer.get("max_model_len")
        student_ids = student_tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        vocabulary = len(student_tokenizer)
        spread = sorted({round(i * (vocabulary - 1) / 63) for i in range(64)})  # ids across the whole vocabulary
        served_text = self._request("/detokenize", {"model": self.model, "tokens": spread})["prompt"]
        student_text = student_tokenizer.decode(spread)
        if answer["tokens"] != student_ids or served_text != student_text:
            raise ConfigError(
                f"model.teacher_server: the teacher at {self.url} tokenises unlike the student (probe ids "
                f"{answer['tokens'][:8]}... vs {student_ids[:8]}...); distillation needs a teacher with the same tokenizer"
            )

    # --- scoring ---------------------------------------------------------------------------
    def check_temperature(self, temperature: float) -> None:
        if not math.isclose(temperature, self.served_temperature, rel_tol=1e-6):
            raise ConfigError(
                f"the rollouts are sampled at temperature {temperature} but the teacher at {self.url} serves "
                f"log-probs at {self.served_temperature}; serve a copy written by `python -m renio_pl.teacher_server "
                f"temper <teacher> <out> --temperature {temperature}` and set model.teacher_server.served_temperature"
            )

    def score(
        self, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, completion_mask: Tensor, temperature: float
    ) -> tuple[TeacherTopK, Tensor]:
        """The teacher's log-probs of each completion token and its top-k, from the server.

        Args:
            input_ids: (B, T_prompt + T) int64 teacher prompts left-padded to `T_prompt`, completions right-padded.
            attention_mask: (B, T_prompt + T) 0/1.
            prompt_length: `T_prompt`.
            completion_mask: (B, T) bool, True on generated tokens.
            temperature: the rollouts' sampling temperature (must equal `served_temperature`).
        Returns:
            `TeacherTopK` with `sampled` (B, T), `ids` and `logprobs` (B, T, top_k), float32 /
            int64, 0 off the mask; and `scored` (B,) bool, False for rollouts left out as too long.
        """
        self.check_temperature(temperature)
        batch, width = completion_mask.shape
        sampled = torch.zeros(batch, width)
        ids = torch.zeros(batch, width, self.top_k, dtype=torch.long)
        logprobs = torch.full((batch, width, self.top_k), TEACHER_LOGPROB_FLOOR)
        scored = torch.ones(batch, dtype=torch.bool)
        rows, sequences = [], []
        for row in range(batch):
            prompt = input_ids[row, :prompt_length][attention_mask[row, :prompt_length].bool()].tolist()
            completion = input_ids[row, prompt_length:][completion_mask[row]].tolist()
            sequence = prompt + completion
            if self.max_model_len is not None and len(sequence) + 1 > self.max_model_len:
                if self.too_long == "refuse":
                    raise ConfigError(
                        f"a teacher prompt plus completion of {len(sequence)} tokens exceeds the teacher server's "
                        f"max_model_len {self.max_model_len}; serve it with a larger --max-model-len, shorten "
                        "data.max_new_tokens, or set model.teacher_server.too_long: skip"
                    )
                scored[row] = False
                continue
            rows.append((row, len(prompt), len(completion)))
            sequences.append(sequence)
        for start in range(0, len(sequences), self.rows_per_request):
            payload = {
                "model": self.model,
                "prompt": sequences[start : start + self.rows_per_request],
                "max_tokens": 1,
                "temperature": 1.0,
                "prompt_logprobs": self.top_k,
            }
            choices = sorted(self._request("/v1/completions", payload)["choices"], key=lambda choice: choice["index"])
            for i, choice in enumerate(choices, start=start):
                (row, prompt_len, completion_len), sequence = rows[i], sequences[i]
                positions = choice["prompt_logprobs"]  # one entry per prompt token; None for the first
                row_sampled, row_ids, row_logprobs = [], [], []
                for t in range(completion_len):
                    entry = positions[prompt_len + t]
                    row_sampled.append(entry[str(sequence[prompt_len + t])]["logprob"])
                    ranked = sorted(entry.items(), key=lambda item: item[1]["rank"])[: self.top_k]
                    if len(ranked) < self.top_k or (ranked and ranked[-1][1]["rank"] > self.top_k):
                        raise RuntimeError(f"the teacher server returned fewer top log-probs than the {self.top_k} asked")
                    row_ids.append([int(token_id) for token_id, _ in ranked])
                    row_logprobs.append([value["logprob"] for _, value in ranked])
                sampled[row, :completion_len] = torch.tensor(row_sampled)
                if self.top_k and completion_len:
                    ids[row, :completion_len] = torch.tensor(row_ids)
                    logprobs[row, :completion_len] = torch.tensor(row_logprobs)
        mask = completion_mask.bool()
        ids = ids * mask[..., None]
        if self.vocabulary is not None and self.top_k and int(ids.max()) >= self.vocabulary:
            raise ConfigError(
                f"the teacher at {self.url} ranks token {int(ids.max())} in its top-k, outside the student's "
                f"{self.vocabulary}-token vocabulary; serve a teacher with the student's vocabulary size"
            )
        return TeacherTopK(sampled * mask, ids, logprobs), scored


if __name__ == "__main__":  # `python -m renio_pl.teacher_server temper ...`, the command users run
    from renio_pl.teacher_server_launch import main

    main()
