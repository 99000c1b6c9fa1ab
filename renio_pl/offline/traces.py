"""`renio-pl-redi-traces`: the teacher samples k completions per problem; graded, they become REDI's data.

Stage 0 of REDI (traces -> SFT -> REDI). Each problem's prompt is rendered with the same
`PromptFormat` as training; the teacher samples `sampling.n` completions with either engine,
sample `j` of problem `i` keyed by `(seed, i, j)` (`renio_pl.sampling`), so the same settings
give the same traces. The verifier grades each completion that ended with EOS against the
problem's reference answer. A completion cut off at `max_new_tokens` is counted and left out:
the data module ends every trace with EOS, which would teach stopping where it was cut.

Written under `output`:
- `sft.jsonl`: every positive, `prompt, positive, answer, problem_index, sample_index`;
- `redi.jsonl`: one triplet per problem with at least one positive and one negative, the first
  of each by sample index (as the REDI authors pick theirs), `prompt, positive, negative,
  answer, problem_index, positive_index, negative_index`; problems without a positive or
  without a negative are skipped and counted;
- `summary.json`: the counts and the provenance.
Every record also carries the provenance: `teacher`, `engine`, `sampling`, `seed`,
`prompt_format`, `verifier`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, lazy_instance

from renio_pl.cli import RenioArgumentParser
from renio_pl.errors import ConfigError
from renio_pl.evaluators.math import MathVerifier, is_correct
from renio_pl.models import DType, load_model, load_tokenizer
from renio_pl.paths import InputPath
from renio_pl.prompt_format import PromptFormat
from renio_pl.prompt_source import PromptSource
from renio_pl.prompts import PromptRow
from renio_pl.rollouts import HFGenerator, RolloutGenerator, SamplingConfig, eos_token_ids
from renio_pl.sampling import stream_key

__all__ = ["build_traces", "select_traces", "main"]

log = logging.getLogger(__name__)


def _import_path(obj: Any) -> str:
    """`module.name` of a function or class, or of an instance's class."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{target.__module__}.{target.__qualname__}"


def select_traces(
    rows: list[PromptRow],
    texts_P_G: list[list[str]],
    finished_P_G: list[list[bool]],
    verifier: Callable[[str, str], bool],
    provenance: dict[str, Any],
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Grade every finished completion; keep all positives for SFT and each problem's first pair for REDI.

    Returns:
        The SFT records, the REDI records and the counts (samples, unfinished, positives,
        negatives, records of each set, problems skipped for stage 2 without a positive or
        without a negative).
    """
    counts = dict.fromkeys(("samples", "unfinished", "positives", "negatives", "skipped_no_positive",
                            "skipped_no_negative"), 0)
    sft, redi = [], []
    grader = MathVerifier(verifier)  # the package's one grading protocol, with this check
    for row, texts_G, finished_G in zip(rows, texts_P_G, finished_P_G):
        finished = [j for j, done in enumerate(finished_G) if done]
        verdicts = grader.grade([texts_G[j] for j in finished], [row.answer] * len(finished))
        graded = [(j, verdict.correct) for j, verdict in zip(finished, verdicts, strict=True)]
        positives = [j for j, correct in graded if correct]
        negatives = [j for j, correct in graded if not correct]
        counts["samples"] += len(texts_G)
        counts["unfinished"] += len(texts_G) - len(graded)
        counts["positives"] += len(positives)
        counts["negatives"] += len(negatives)
        sft += [_record(row, provenance, positive=texts_G[j], sample_index=j) for j in positives]
        if not positives:
            counts["skipped_no_positive"] += 1
        elif not negatives:
            counts["skipped_no_negative"] += 1
        else:
            j, k = positives[0], negatives[0]
            redi.append(
                _record(row, provenance, positive=texts_G[j], negative=texts_G[k], positive_index=j, negative_index=k)
            )
    counts["sft_records"], counts["redi_records"] = len(sft), len(redi)
    return sft, redi, counts


def build_traces(
    teacher: InputPath,
    prompts: InputPath,
    output: str,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    answer_after: str = "",
    split: str = "train",
    prompt_format: PromptFormat = PromptFormat(),
    engine: RolloutGenerator = lazy_instance(HFGenerator),
    sampling: SamplingConfig = SamplingConfig(n=8, temperature=1.0),
    verifier: Callable[[str, str], bool] = is_correct,
    dtype: DType = "float32",
    device: str = "auto",
    limit: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample, grade and write the SFT and REDI trace sets of a prompt set.

    Args:
        teacher: hub id or local folder of the teacher that writes the traces.
        prompts: problems with reference answers: a jsonl / parquet file or a hub data set id.
        output: folder for `sft.jsonl`, `redi.jsonl` and `summary.json` (created).
        prompt_field: column holding the problem text.
        answer_field: column holding the reference answer (records without one are skipped, counted).
        answer_after: keep only the text after the last occurrence of this marker in each
            answer (GSM8K: `####`); empty keeps the whole answer.
        split: split of a hub data set.
        prompt_format: template, system message and chat-template variables; use the one the
            student will be trained with (`data.prompt_format`).
        engine: `renio_pl.rollouts.HFGenerator` or `renio_pl.vllm_engine.VLLMGenerator`.
        sampling: `n` completions per problem (the k of the recipe), temperature, top_p, top_k,
            max_new_tokens.
        verifier: `(completion, answer) -> bool`, an import path on the command line or in YAML.
        dtype: dtype the teacher is loaded in.
        device: where the teacher runs: `auto` (CUDA when available), `cpu`, `cuda`, ...
            With VLLMGenerator, `cpu` keeps the HF copy (the weights vLLM syncs from) off the GPU.
        limit: only the first `limit` problems (0: all), for quick runs.
        seed: keys every sample's random stream.
    Returns:
        The summary written to `summary.json`.
    """
    if limit < 0:
        raise ConfigError(f"limit must be >= 0 (0: every problem); got {limit}")
    source = PromptSource(prompts, "prompts", prompt_field, answer_field, answer_after, split, prompt_format=prompt_format)
    rows = source.load_rows()
    rows = rows[:limit] if limit else rows
    answered = [row for row in rows if row.answer]
    tokenizer = load_tokenizer(teacher, option="teacher")
    model = load_model(teacher, dtype, option="teacher").eval()
    model.to(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    prompt_ids = [source.render(tokenizer, row)[0] for row in answered]
    seeds = [stream_key(seed, row.index) for row in answered]
    log.info("sampling %d completions for each of %d problems", sampling.n, len(answered))
    completions_P_G = engine.generate(model, tokenizer, prompt_ids, sampling, seeds)
    provenance = {
        "teacher": teacher,
        "engine": _import_path(engine),
        "sampling": asdict(sampling),
        "seed": seed,
        "prompt_format": asdict(prompt_format),
        "verifier": _import_path(verifier),
    }
    eos_ids = eos_token_ids(model, tokenizer)
    texts_P_G = [[tokenizer.decode(c, skip_special_tokens=True) for c in group] for group in completions_P_G]
    finished_P_G = [[bool(c) and c[-1] in eos_ids for c in group] for group in completions_P_G]
    sft, redi, counts = select_traces(answered, texts_P_G, finished_P_G, verifier, provenance)
    counts = {"problems": len(rows), "without_answer": len(rows) - len(answered), **counts}
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("sft.jsonl", sft), ("redi.jsonl", redi)):
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = {**counts, **provenance, "prompts": prompts}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    log.info("traces in %s: %s", folder, json.dumps(counts))
    return summary


def _record(row: PromptRow, provenance: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"prompt": row.problem, **fields, "answer": row.answer, "problem_index": row.index, **provenance}


def main(argv: list[str] | None = None) -> None:
    """Entry point of `renio-pl-redi-traces` (every argument of `build_traces`, and `--config`)."""
    parser = RenioArgumentParser(description=build_traces.__doc__.splitlines()[0], default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with these arguments")
    parser.add_function_arguments(build_traces)
    config = parser.parse_args(argv)
    arguments = parser.instantiate_classes(config).as_dict()
    arguments.pop("config", None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build_traces(**arguments)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
