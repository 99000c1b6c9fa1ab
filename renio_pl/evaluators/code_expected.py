"""The expected outputs of each HumanEval+ / MBPP+ task, computed once and cached on disk.

They come from running each task's canonical solution on its inputs, each call timed, in
the sandbox (`run_canonical`), computed only for the tasks asked for. The cache is under
$RENIO_PL_CACHE, else ~/.cache/renio_pl: one folder per data file's sha256, two files per
task (`<task>.json`: times, digests, flags and offsets; `<task>.values`: the encoded
outputs), mode 600, written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from renio_pl.evaluators.code_oracles import MBPP_NOT_NONE
from renio_pl.evaluators.code_problems import STAGES, Expected, Problem, data_path, load_problems
from renio_pl.evaluators.code_runs import run_canonical

__all__ = ["Expected", "expected_outputs"]

log = logging.getLogger(__name__)

_CACHE_VERSION = "v1"


def _cache_dir(path: Path) -> Path:
    root = Path(os.environ.get("RENIO_PL_CACHE") or Path.home() / ".cache" / "renio_pl")
    return root / "code_expected" / _CACHE_VERSION / _sha256(path)


@functools.cache
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_outputs(dataset: str, task_ids: list[str], workers: int) -> dict[str, dict[str, Expected]]:
    """Expected outputs per task and stage: from the cache, or computed (in parallel) and cached."""
    folder = _cache_dir(data_path(dataset))
    paths = {task_id: folder / task_id.replace("/", "_") for task_id in task_ids}
    missing = [task_id for task_id in task_ids if not paths[task_id].with_suffix(".json").is_file()]
    if missing:
        started = time.monotonic()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        problems = load_problems(dataset)

        def compute(task_id: str) -> None:
            runs = {stage: run_canonical(problems[task_id], stage) for stage in STAGES}
            _write_cache(paths[task_id], dataset, problems[task_id], runs)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(compute, missing))
        log.info("computed expected outputs of %d %s tasks in %.1fs", len(missing), dataset,
                 time.monotonic() - started)
    return {task_id: _read_cache(paths[task_id]) for task_id in task_ids}


def _write_cache(path: Path, dataset: str, problem: Problem, runs: dict[str, list]) -> None:
    """Writes `<path>.json` (times, digests, flags, offsets) and `<path>.values` (encoded outputs)."""
    meta: dict[str, dict[str, list]] = {}
    values = bytearray()
    not_none = dataset == "mbpp" and problem.entry_point in MBPP_NOT_NONE
    for stage, calls in runs.items():
        columns: dict[str, list] = {"times": [], "sha": [], "by_digest": [], "floats": [], "offsets": []}
        for report, value in calls:
            if not_none:  # EvalPlus keeps only whether the canonical output is not None
                value, report = json.dumps(["json", value != b'["json", null]']).encode(), {**report, "sha": None}
            columns["times"].append(report["t"])
            columns["sha"].append(report["sha"])
            columns["by_digest"].append(report["by_digest"])
            columns["floats"].append(report["floats"] and not not_none)
            columns["offsets"].append(None if value is None else len(values))
            if value is not None:
                values += value + b"\n"
        meta[stage] = columns
    _write_private(path.with_suffix(".values"), bytes(values))
    _write_private(path.with_suffix(".json"), json.dumps(meta).encode())  # last: marks the entry complete


def _write_private(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name)  # mode 600
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def _read_cache(path: Path) -> dict[str, Expected]:
    meta = json.loads(path.with_suffix(".json").read_text())
    return {stage: Expected(**columns, values_path=path.with_suffix(".values")) for stage, columns in meta.items()}
