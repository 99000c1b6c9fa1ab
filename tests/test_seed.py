"""The data seed follows `seed_everything` unless `data.seed` is set: `--seed_everything N` alone changes the run."""

from __future__ import annotations

import pytest
from lightning.pytorch import seed_everything

from renio_pl.datamodule import OnPolicyDataModule, data_seed
from tests.conftest import small_fit
from tests.test_resume import RecordBatches, records


def test_data_seed_follows_the_global_seed_unless_given(monkeypatch, model_dirs):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert data_seed(None) == 0  # no seed_everything: the old default
    seed_everything(17)
    assert data_seed(None) == 17 and data_seed(5) == 5
    assert OnPolicyDataModule(tokenizer=str(model_dirs["student"])).seed == 17
    assert OnPolicyDataModule(tokenizer=str(model_dirs["student"]), seed=2).seed == 2


@pytest.mark.slow
def test_seed_everything_alone_changes_the_rollouts(model_dirs, prompt_file, tmp_path):
    """Three real fits: seed 3 twice (identical tokens and losses), seed 4 (other tokens); data.seed left unset."""
    trained = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        record = {"class_path": f"{RecordBatches.__module__}.RecordBatches",
                  "init_args": {"path": str(tmp_path / name / "batches.jsonl")}}
        done = small_fit(model_dirs, prompt_file, tmp_path / name, [record], "--seed_everything", str(seed),
                         data={"seed": None})  # small_fit pins data.seed 0; unset, it follows seed_everything
        assert done.returncode == 0, done.stderr[-3000:]
        trained[name] = {step: (r["tokens"], r["loss"]) for step, r in records(tmp_path / name).items()}
    assert len(trained["a"]) == 12 and trained["a"] == trained["b"]
    assert all(trained["a"][step][0] != trained["c"][step][0] for step in trained["a"])
