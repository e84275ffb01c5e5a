"""steer-heal's MFV evaluation reproduces tinymfv's own per-row numbers (wassname/tinymfv @ 01e9026).

The reference rows were made once by running tinymfv itself at batch 1 (see
tests/fixtures/make_tinymfv_fixture.py, never run in CI); here steer-heal evaluates the same
SmolLM2 vignettes batched and must match row by row."""
import json
import math
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "tinymfv_smollm2_classic28_t32.json"


@pytest.mark.slow
def test_rows_match_tinymfv_batch1_reference(smol, mfv_dir):
    from steer_heal.evals.mfv import evaluate_mfv
    from steer_heal.evals.mfv_data import load_vignettes

    ref = json.loads(FIXTURE.read_text())
    m = ref["meta"]
    assert m["tinymfv_commit"].startswith("01e9026") and m["batch_size"] == 1
    rows = load_vignettes(mfv_dir, m["config"], m["condition"], m["n"], 0)
    assert [r["id"] for r in rows] == [r["id"] for r in ref["rows"]]  # the same stratified subset
    res = evaluate_mfv(smol.model, smol.tokenizer, rows, think_tokens=m["think_tokens"], batch_size=len(rows),
                       progress=False)
    worst = {"p": 0.0, "pmass": 0.0, "nll": 0.0}
    for ours, theirs in zip(res.rows, ref["rows"]):
        assert ours["id"] == theirs["id"]
        worst["p"] = max(worst["p"], max(abs(a - b) for a, b in zip(ours["p"], theirs["p"])))
        worst["pmass"] = max(worst["pmass"], abs(ours["pmass_allowed"] - theirs["pmass_allowed"]))
        worst["nll"] = max(worst["nll"], abs(ours["nll_prefill"] - theirs["nll_prefill"]))
    assert worst["p"] < 1e-3 and worst["pmass"] < 1e-3 and worst["nll"] < 1e-3, worst
    s = ref["summary"]
    assert res.pmass_allowed == pytest.approx(s["pmass_allowed"], abs=1e-3)
    assert res.nll_prefill == pytest.approx(s["nll_prefill"], abs=1e-3)
    assert res.top1_acc == pytest.approx(s["top1_acc"]) and res.frac_unscorable == pytest.approx(s["frac_unscorable"])
    assert res.profile == pytest.approx(s["profile"], abs=1e-3)
    assert all(math.isfinite(x["pmass_allowed"]) for x in res.rows)
