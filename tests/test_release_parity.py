"""The parity check against the ReNIO release (evaluation/release_parity).

`test_parity_with_release` runs the whole comparison when RENIO_PL_RELEASE_DIR points at a
checkout of github.com/BDML-lab/ReNIO and RENIO_PL_RELEASE_PYTHON at the Python of a venv with
its pinned stack; it skips otherwise. The other tests check the script's own machinery without
the release: the batch layouts, the verdicts, and that the fixed rollouts exercise what each
case claims to (weights away from 1, the clip order, the ema cap).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "evaluation" / "release_parity"))

import fixture  # noqa: E402
import run  # noqa: E402
from fixture import PAD_ID, Case, completion_mask, layout  # noqa: E402

RELEASE_DIR = os.environ.get("RENIO_PL_RELEASE_DIR")
RELEASE_PYTHON = os.environ.get("RENIO_PL_RELEASE_PYTHON")


def test_layouts_put_every_completion_after_the_padded_prompt_width():
    prompts, completions = [[5, 6], [7, 8, 9]], [[10, 11, 12], [13]]
    ids, mask, width = layout(prompts, completions, "left")
    assert width == 3
    assert ids.tolist() == [[PAD_ID, 5, 6, 10, 11, 12], [7, 8, 9, 13, PAD_ID, PAD_ID]]
    assert mask.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    ids, mask, width = layout(prompts, completions, "right")  # the release's collator: a gap before the completion
    assert ids.tolist() == [[5, 6, PAD_ID, 10, 11, 12], [7, 8, 9, 13, PAD_ID, PAD_ID]]
    assert mask.tolist() == [[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert completion_mask(completions).tolist() == [[True, True, True], [True, False, False]]


def side(weights, loss=0.5, grad=1.0):
    """One step's results as a side writes them."""
    weights = torch.tensor(weights)
    return {"weights": weights, "token_loss": torch.zeros(len(weights), 2), "loss": torch.tensor(loss),
            "grads": {"w": torch.full((2,), grad)}}


def test_compare_gives_each_case_its_verdict():
    cases = [Case("same", "opd", [[0]], {}, {}), Case("near", "opd", [[0]], {}, {}),
             Case("should differ", "opd", [[0]], {}, {}, expect="differ"),
             Case("differs", "opd", [[0]], {}, {}, expect="differ"), Case("missing option", "opd", [[0]], {}, {})]
    ours = [{"steps": [side([1.0, 1.0])]}, {"steps": [side([1.0, 1.0], grad=1.0 + 3e-5)]},
            {"steps": [side([1.0, 1.0])]}, {"steps": [side([2.0, 0.0])]}, {"error": "no such option"}]
    theirs = [{"steps": [side([1.0, 1.0])]} for _ in cases]
    rows = run.compare(ours, theirs, 1e-5, cases)
    assert [r["verdict"] for r in rows] == [
        "match", "MISMATCH", "EXPECTED DIFFERENCE NOT EXERCISED", "differs, as expected", "not run"]
    assert rows[1]["diff"]["grads"] == pytest.approx(3e-5, rel=1e-2)  # float32 1 + 3e-5
    assert rows[3]["diff"]["weights"] == 1.0 and rows[3]["rows_with_token_loss_diff"] == [[]]


def test_compare_refuses_different_gradient_names():
    mine, theirs = side([1.0]), side([1.0])
    theirs["grads"] = {"v": theirs["grads"]["w"]}
    with pytest.raises(ValueError, match="gradient names differ"):
        run.compare([{"steps": [mine]}], [{"steps": [theirs]}], 1e-5, [Case("c", "opd", [[0]], {}, {})])


@pytest.mark.slow
def test_fixed_rollouts_exercise_what_each_case_claims(tmp_path):
    run.build_fixture(tmp_path)
    done = subprocess.run([sys.executable, str(run.HERE / "ours_side.py"), str(tmp_path), str(tmp_path / "ours.pt")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["case"]: r for r in torch.load(tmp_path / "ours.pt")["cases"]}
    assert all("error" not in r for r in results.values()), [r.get("error") for r in results.values()]

    def weights(case, step=0):
        return results[case.name]["steps"][step]["weights"]

    opd, opsd, above_ours, above_release, ema_capped, ema_uncapped, _ = fixture.CASES
    for case in (opd, opsd):  # ReNIO is not a no-op on these rollouts
        assert weights(case).std() > 0.1
    # threshold > clip: the release's order gives every rollout exp(0) = 1; renio_pl's does not
    assert torch.equal(weights(above_release), torch.ones(6)) and weights(above_ours).std() > 0.1
    # the ema running mean lags: the cap of 10 binds in the last step, and without it a weight passes 10
    assert weights(ema_capped, 2).max() == 10.0 and weights(ema_uncapped, 2).max() > 10.5
    for case in fixture.CASES:
        for step in results[case.name]["steps"]:
            assert step["loss"] > 0 and any(g.abs().sum() > 0 for g in step["grads"].values())


@pytest.mark.slow
@pytest.mark.skipif(not (RELEASE_DIR and RELEASE_PYTHON),
                    reason="RENIO_PL_RELEASE_DIR (a ReNIO release checkout) or RENIO_PL_RELEASE_PYTHON unset")
def test_parity_with_release(tmp_path):
    code = run.main(["--json", str(tmp_path / "parity.json"), "--report", str(tmp_path / "report.md")])
    verdicts = {row["case"]: row["verdict"] for row in json.loads((tmp_path / "parity.json").read_text())["cases"]}
    assert code == 0, verdicts
    assert verdicts == {
        case.name: "match" if case.expect == "equal" else "differs, as expected" for case in fixture.CASES
    }
