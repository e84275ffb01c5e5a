"""The comparison's intervals and verdicts against references computed another way: a naive loop
through the project's own scalar MFV aggregation, the analytic standard error of a mean, and fake
rows whose shift must flip a verdict."""
import json
import math
import statistics

import numpy as np
import pytest

from steer_heal import stats
from steer_heal.compare_report import Report
from steer_heal.evals.mfv import MFVResult, trait_nats

AXIS = {"Care": 1, "Authority": -1}


def _mfv_values(rng, n_seeds=3, n_items=20):
    p = rng.dirichlet(np.ones(7), size=(n_seeds, n_items))
    p[0, 3] = np.nan  # an unscorable vignette
    return p


def test_bootstrap_replicates_equal_a_naive_loop_through_the_mfv_aggregation():
    rng = np.random.default_rng(0)
    x = _mfv_values(rng)
    v = stats.Values(x, "trait_nats", AXIS, seeds=(1, 2, 3))
    items, seeds, _ = stats.draws(np.random.default_rng(7), 50, v)
    fast = stats.replicates(v, items, seeds)
    for b in range(50):
        per_seed = []
        for s in seeds[b]:
            rows = [x[s, i] for i in items[b] if np.all(np.isfinite(x[s, i]))]
            profile = [statistics.fmean(r[f] for r in rows) for f in range(7)]
            res = MFVResult(rows=[], profile=profile, human_profile=[], pmass_allowed=0, frac_unscorable=0,
                            nll_prefill=0, top1_acc=0, informedness=0, think_tokens=0)
            per_seed.append(trait_nats(res, AXIS))
        assert fast[b] == pytest.approx(statistics.fmean(per_seed), abs=1e-12)
    # the point estimate is the same statistic on the data as observed
    rows = [[x[s, i] for i in range(x.shape[1]) if np.all(np.isfinite(x[s, i]))] for s in range(3)]
    want = statistics.fmean(trait_nats(MFVResult([], [statistics.fmean(r[f] for r in rs) for f in range(7)], [], 0, 0,
                                                  0, 0, 0, 0), AXIS) for rs in rows)
    assert stats.point(v) == pytest.approx(want, abs=1e-12)


def test_mean_bootstrap_matches_the_analytic_standard_error():
    """One seed, the mean over items: the bootstrap sd is the plug-in standard error
    sd_pop / sqrt(n), and the 95% interval is about +-1.96 of it."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 1.0, size=(1, 400))
    v = stats.Values(x)
    items, seeds, _ = stats.draws(np.random.default_rng(2), 20000, v)
    r = stats.replicates(v, items, seeds)
    se = x.std() / math.sqrt(x.shape[1])
    assert r.std() == pytest.approx(se, rel=0.03)
    iv = stats.interval(v, n_boot=20000)
    assert iv.value == pytest.approx(x.mean())
    assert iv.hi - iv.lo == pytest.approx(2 * 1.96 * se, rel=0.05)


def test_paired_difference_uses_the_same_items_and_seeds():
    """a = b + 0.1 item for item: every paired replicate is exactly 0.1, so the interval is a point;
    unpaired (different seed lists) it is not."""
    rng = np.random.default_rng(3)
    b = rng.normal(size=(3, 30))
    a = b + 0.1
    d = stats.paired_diff(stats.Values(a, seeds=(1, 2, 3)), stats.Values(b, seeds=(1, 2, 3)), n_boot=500)
    assert d.value == pytest.approx(0.1) and d.lo == pytest.approx(0.1) and d.hi == pytest.approx(0.1)
    u = stats.paired_diff(stats.Values(a, seeds=(1, 2, 3)), stats.Values(b, seeds=(4, 5, 6)), n_boot=500)
    assert u.hi - u.lo > 0.05


def test_verdict_directions():
    assert stats.verdict(stats.Interval(0.2, 0.1, 0.3)) == "better"
    assert stats.verdict(stats.Interval(0.2, 0.1, 0.3), higher_is_better=False) == "worse"
    assert stats.verdict(stats.Interval(-0.2, -0.3, -0.1)) == "worse"
    assert stats.verdict(stats.Interval(0.0, -0.1, 0.1)) == "not distinguishable"
    assert stats.verdict(stats.Interval(float("nan"), float("nan"), float("nan"))) == "not distinguishable"


def _rows(shift_trait=0.0, shift_incoh=0.0, n_prompts=32, n_vign=40, seed=0):
    """Fake evaluation rows: base, prompt, a trained arm (3 seeds) and its placebo."""
    rng = np.random.default_rng(seed)
    llr = rng.normal(0, 0.1, n_prompts)
    inc = rng.normal(2.0, 0.5, n_prompts)
    p = rng.dirichlet(np.ones(7) * 5, size=n_vign)
    pm = rng.uniform(0.04, 0.06, n_vign)

    def items(dl=0.0, di=0.0, noise=0.0, pmass_scale=1.0, s=0):
        r = np.random.default_rng(100 + s)
        return dict(trait_llr_heldout=list(llr + dl + r.normal(0, noise, n_prompts)),
                    incoherence=list(inc + di + r.normal(0, noise, n_prompts)),
                    coherent=[1.0] * n_prompts, mfv_p=p.tolist(), mfv_pmass=list(pm * pmass_scale),
                    mfv_nll_prefill=[3.0] * n_vign)

    rows = [dict(arm="base", kind="base", seed=None, items=items()),
            dict(arm="prompt", kind="prompt", seed=None, items=items(dl=0.05))]
    for s in (1, 2, 3):
        arm = items(dl=shift_trait, di=shift_incoh, noise=0.05, s=s)
        rows.append(dict(arm="arm", kind="online", seed=s, items=arm))
        rows.append(dict(arm="arm_placebo", kind="online", seed=s, items=items(noise=0.05, s=s + 10)))
    arms = [SimpleArm("base", "base"), SimpleArm("prompt", "prompt"), SimpleArm("arm", "online"),
            SimpleArm("arm_placebo", "online", "placebo", "arm")]
    return arms, rows


class SimpleArm:
    def __init__(self, name, kind, control="", placebo_of=""):
        self.name, self.kind, self.control, self.placebo_of = name, kind, control, placebo_of


def _verdict(rep, a, b, measure):
    return next(v for v in rep.verdicts() if v["a"] == a and v["b"] == b and v["measure"] == measure)


def test_verdict_flips_when_an_arm_is_shifted_past_its_interval():
    arms, rows = _rows()
    rep = Report("t", "m", "p", 0, arms, rows, AXIS, judges={"trait_llr_heldout": 0.9}, n_boot=500)
    v = _verdict(rep, "arm", "arm_placebo", "trait_llr_heldout")
    assert v["verdict"] == "not distinguishable"
    width = v["hi"] - v["lo"]
    arms, rows = _rows(shift_trait=2 * width)  # moved by twice the interval's width
    rep = Report("t", "m", "p", 0, arms, rows, AXIS, judges={"trait_llr_heldout": 0.9}, n_boot=500)
    v = _verdict(rep, "arm", "arm_placebo", "trait_llr_heldout")
    assert v["verdict"] == "better" and v["lo"] > 0
    arms, rows = _rows(shift_incoh=1.0)  # incoherence up: worse (lower is better)
    rep = Report("t", "m", "p", 0, arms, rows, AXIS, n_boot=500)
    assert _verdict(rep, "arm", "base", "incoherence")["verdict"] == "worse"


def test_untrusted_judge_gives_no_verdict_and_pmass_drop_is_flagged():
    arms, rows = _rows(shift_trait=1.0)
    rep = Report("t", "m", "p", 0, arms, rows, AXIS, judges={"trait_llr_heldout": 0.6}, n_boot=200)
    v = _verdict(rep, "arm", "base", "trait_llr_heldout")
    assert v["verdict"].startswith("not used") and "untrusted" in rep.markdown()
    for r in rows:
        if r["arm"] == "arm":
            r["items"]["mfv_pmass"] = [x * 0.5 for x in r["items"]["mfv_pmass"]]
    rep = Report("t", "m", "p", 0, arms, rows, AXIS, n_boot=200)
    assert rep.pmass_flag("arm") and not rep.pmass_flag("arm_placebo")
    assert "format shift" in _verdict(rep, "arm", "base", "trait_nats")["line"]
    # trait on the answering vignettes: the arm's halved pmass puts most rows under the base's median
    assert rep.values("arm", "trait_nats_answering").x[0].shape == (40, 7)
    assert np.isnan(rep.values("arm", "trait_nats_answering").x).any()


def test_report_references_each_trained_arm_to_its_controls():
    arms, rows = _rows()
    rep = Report("t", "m", "p", 0, arms, rows, AXIS, pairs=[["arm", "prompt"]], n_boot=100)
    qs = rep.questions()
    assert ("arm", "base", "base") in qs and ("arm", "prompt", "prompt") in qs
    assert ("arm", "arm_placebo", "placebo") in qs and ("arm", "prompt", "pair") in qs
    assert not any(a == "arm_placebo" for a, _, _ in qs)  # a placebo is a reference, not a subject


def test_t_interval_equals_the_textbook_formula():
    iv = stats.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert iv.value == 2.0 and iv.hi - 2.0 == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    one = stats.t_interval([5.0])  # one seed: a value, no interval, never a verdict
    assert one.value == 5.0 and math.isnan(one.lo) and not one.excludes_zero() and one.fmt("{:.1f}") == "5.0 [n=1]"
    try:
        from scipy.stats import t
    except ImportError:
        return
    for df, q in enumerate(stats._T975, start=1):
        assert q == pytest.approx(t.ppf(0.975, df), abs=1e-3)


def test_drift_table_is_the_mean_over_seeds_per_round(tmp_path):
    arms = [SimpleArm("base", "base"), SimpleArm("rmse", "iterative"), SimpleArm("none", "online"),
            SimpleArm("rmse_placebo", "iterative", "placebo", "rmse")]
    rows = [dict(arm="base", kind="base", seed=None, items={})]
    for s in (1, 2):
        rows.append(dict(arm="rmse_placebo", kind="iterative", seed=s, items={}, rounds=[
            dict(round=k, coh_healed=0.9) for k in range(2)]))
        rows.append(dict(arm="rmse", kind="iterative", seed=s, items={}, rounds=[
            dict(round=k, coh_healed=1.0 - 0.1 * k * s, barrier_active_frac=0.5, D_rmse=0.2 * s) for k in range(3)]))
        rows.append(dict(arm="none", kind="online", seed=s, items={}, rounds=[
            dict(bake=k, coherence=0.9, repetition=0.1 * k) for k in range(2)]))
    rep = Report("t", "m/x", "p", 0, arms, rows, AXIS, n_boot=10)
    series = dict(rep.drift_series("rmse", "coherent"))
    assert series[2].value == pytest.approx(1.0 - 0.1 * 2 * 1.5)  # round 2: mean of 0.8 and 0.6
    assert series[2].hi - series[2].value == pytest.approx(12.706 * statistics.stdev([0.8, 0.6]) / math.sqrt(2))
    assert dict(rep.drift_series("none", "repetition"))[1].value == pytest.approx(0.1)
    md = rep.drift_markdown()
    assert "| rmse | 2 | 2 |" in md and "| none | 1 | 2 |" in md and "| rmse_placebo | 1 | 2 |" in md
    look = rep.drift_look(rep.drift_arms())  # a placebo: its arm's colour, dotted; online dashed; steered solid
    assert look["rmse_placebo"]["colour"] == look["rmse"]["colour"] != look["none"]["colour"]
    assert look["rmse"]["dash"] == [] and look["rmse_placebo"]["dash"] and look["none"]["dash"]
    assert look["rmse_placebo"]["dash"] != look["none"]["dash"]
    rep.drift_figure(tmp_path)
    assert (tmp_path / "drift.png").exists()
    page = (tmp_path / "drift.html").read_text()
    assert json.dumps(look["rmse_placebo"]) in page  # the canvas draws with the PNG's colours and dashes
