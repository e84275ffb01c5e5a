"""The comparison's intervals and verdicts against references computed another way: a naive loop
through the project's own scalar MFV aggregation, the analytic standard error of a mean, and fake
rows whose shift must flip a verdict."""
import json
import math
import random
import statistics

import numpy as np
import pytest

from steer_heal import stats
from steer_heal.evals.mfv import MFVResult, trait_nats
from steer_heal.study.analysis import Study
from steer_heal.study.figures import drift_data, drift_figure, drift_look
from steer_heal.study.heal import answers, heal_gain, mfv_transfer, retention
from steer_heal.study.tables import drift_markdown, heal_markdown, markdown, mfv_transfer_markdown
from steer_heal.study.verdicts import verdicts

AXIS = {"Care": 1, "Authority": -1}


def _mfv_values(rng, n_seeds=3, n_items=20):
    p = rng.dirichlet(np.ones(7), size=(n_seeds, n_items))
    p[0, 3] = np.nan  # an unscorable vignette
    return p


def test_item_replicates_equal_a_naive_loop_through_the_mfv_aggregation():
    """The trait_nats item bootstrap against a naive loop through the project's own scalar MFV aggregation, on
    item draws made here by another generator (python's random), not by stats."""
    rng = np.random.default_rng(0)
    x = _mfv_values(rng)
    v = stats.Values(x, "trait_nats", AXIS, seeds=(1, 2, 3))
    pick = random.Random(7)
    items = np.array([[pick.randrange(x.shape[1]) for _ in range(x.shape[1])] for _ in range(50)])
    fast = stats.item_replicates(v, x, items)

    def naive(rows_by_seed):
        per_seed = []
        for rows in rows_by_seed:
            rows = [r for r in rows if np.all(np.isfinite(r))]
            profile = [statistics.fmean(r[f] for r in rows) for f in range(7)]
            res = MFVResult(rows=[], profile=profile, human_profile=[], pmass_allowed=0, frac_unscorable=0,
                            nll_prefill=0, top1_acc=0, informedness=0, think_tokens=0)
            per_seed.append(trait_nats(res, AXIS))
        return statistics.fmean(per_seed)

    for b in range(50):
        assert fast[b] == pytest.approx(naive([[x[s, i] for i in items[b]] for s in range(3)]), abs=1e-12)
    assert stats.point(v) == pytest.approx(naive([list(x[s]) for s in range(3)]), abs=1e-12)


def test_one_seed_interval_is_the_textbook_t_interval_of_a_mean():
    """One evaluation (an untrained arm): mean +- t(0.975, n-1) sd / sqrt(n), computed here in float64 by hand."""
    rng = np.random.default_rng(1)
    xs = rng.normal(0.3, 1.0, size=40)
    iv = stats.interval(stats.Values(xs[None, :]))
    m = math.fsum(xs) / 40
    sd = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / 39)
    assert iv.value == pytest.approx(m, abs=1e-12)
    assert iv.hi - m == pytest.approx(2.022691 * sd / math.sqrt(40), rel=1e-5)  # t(0.975, 39) from a table


def test_seed_part_of_a_paired_difference_by_hand():
    """3 seeds x 4 items, differences with a seed effect and no item effect beyond noise: worked by hand."""
    d = np.array([[1.0, 1.2, 0.8, 1.0],
                  [2.0, 2.1, 1.9, 2.0],
                  [0.5, 0.4, 0.6, 0.5]])
    iv = stats.paired_diff(stats.Values(d, seeds=(1, 2, 3)), stats.Values(np.zeros_like(d), seeds=(1, 2, 3)))
    r = [1.0, 2.0, 0.5]  # seed means
    seed_part = statistics.variance(r) / 3
    c = [statistics.fmean(col) for col in zip(*d)]  # item means
    g = statistics.fmean(r)
    ms_res = sum((d[s][i] - r[s] - c[i] + g) ** 2 for s in range(3) for i in range(4)) / (2 * 3)
    item_part = max(statistics.variance(c) / 4 - ms_res / (3 * 4), 0.0)
    var = seed_part + item_part
    df = var ** 2 / (seed_part ** 2 / 2 + (item_part ** 2 / 3 if item_part else 0.0))
    assert iv.value == pytest.approx(g)
    assert iv.se == pytest.approx(math.sqrt(var), rel=1e-9) and iv.df == pytest.approx(df, rel=1e-9)
    assert item_part == 0.0 and iv.hi - g == pytest.approx(4.302653 * math.sqrt(seed_part), rel=1e-5)


def _null_draw(rng, kind, S, n, seed_sd, inter_sd, resid=1.0):
    """Two arms with no true difference (over the population of seeds and items): shared item effects, an arm x
    item interaction, seed effects and noise."""
    items = rng.normal(0, 0.5, n)
    a = items + rng.normal(0, inter_sd, n) + rng.normal(0, seed_sd, (S, 1)) + rng.normal(0, resid, (S, n))
    if kind == "untrained":  # b: one greedy evaluation, its own noise per item
        return stats.Values(a, seeds=tuple(range(S))), stats.Values((items + rng.normal(0, resid, n))[None, :])
    b = items + rng.normal(0, seed_sd, (S, 1)) + rng.normal(0, resid, (S, n))
    seeds_b = tuple(range(S)) if kind == "paired" else tuple(range(100, 100 + S))
    return stats.Values(a, seeds=tuple(range(S))), stats.Values(b, seeds=seeds_b)


@pytest.mark.parametrize("kind", ["paired", "unpaired", "untrained"])
@pytest.mark.parametrize("S", [3, 5])
def test_interval_covers_a_known_null_at_its_nominal_rate(kind, S):
    """Coverage of 0 by the 95% interval of a - b on simulated nulls, at seed-to-seed sd 0, 1 and 4 times the item
    standard error, with and without an arm x item interaction: within [0.90, 0.99] (the percentile bootstrap it
    replaced covered 0.79 at S = 3, ratio 4)."""
    rng = np.random.default_rng(S * 10 + len(kind))
    n, draws = 32, 800
    for ratio in (0.0, 1.0, 4.0):
        for inter in (0.0, 0.5):
            hits = 0
            for _ in range(draws):
                a, b = _null_draw(rng, kind, S, n, ratio / math.sqrt(n), inter)
                d = stats.paired_diff(a, b)
                hits += d.lo <= 0 <= d.hi
                assert (d.p() < 0.05) == d.excludes_zero()  # the p-value and the interval agree
            assert 0.90 <= hits / draws <= 0.99, (kind, S, ratio, inter, hits / draws)


def test_trait_nats_interval_carries_the_seed_spread():
    """A trait_nats difference whose seeds disagree: the interval is wider than the items-only one of a single
    seed, and at 3 seeds it uses Student's t near 2 degrees of freedom."""
    rng = np.random.default_rng(4)
    base = rng.dirichlet(np.ones(7) * 5, size=60)
    shift = np.array([0.04, -0.02, 0.01])  # per-seed Care shift
    a = np.repeat(base[None], 3, axis=0)
    a[:, :, 0] += shift[:, None]
    a /= a.sum(-1, keepdims=True)
    va, vb = stats.Values(a, "trait_nats", AXIS, (1, 2, 3)), stats.Values(base[None], "trait_nats", AXIS)
    d = stats.paired_diff(va, vb, n_boot=400)
    one = stats.paired_diff(stats.Values(a[:1], "trait_nats", AXIS), vb, n_boot=400)
    assert d.hi - d.lo > 3 * (one.hi - one.lo) and d.df < 3 and d.dropped == 0


def test_holm_adjustment_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> running max 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adj = stats.holm([0.2, float("nan"), 0.01])  # NaN is not part of the family (m = 2)
    assert adj[0] == pytest.approx(0.2) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)


def test_no_verdict_under_three_seeds_and_primary_verdicts_follow_holm():
    two = stats.Interval(0.3, 0.1, 0.5, se=0.05, df=1, n_seeds=2)
    assert stats.verdict(two).startswith("no verdict (n = 2")
    three = stats.Interval(0.3, 0.1, 0.5, se=0.05, df=2, n_seeds=3)
    assert stats.verdict(three) == "better"
    assert stats.verdict(three, p_adjusted=0.2) == "not distinguishable"  # its family's correction wins
    assert stats.verdict(three, higher_is_better=False, p_adjusted=0.01) == "worse"


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
                    incoh_ctx=list(inc - 0.5 + di + r.normal(0, noise, n_prompts)),
                    verbalisation=list(0.2 + dl + r.normal(0, 0.1 + noise, n_prompts)),
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
    return next(v for v in verdicts(rep) if v["a"] == a and v["b"] == b and v["measure"] == measure)


def test_verdict_flips_when_an_arm_is_shifted_past_its_interval():
    arms, rows = _rows()
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, judges={"trait_llr_heldout": 0.9}, n_boot=500)
    v = _verdict(rep, "arm", "arm_placebo", "trait_llr_heldout")
    assert v["verdict"] == "not distinguishable"
    width = v["hi"] - v["lo"]
    arms, rows = _rows(shift_trait=2 * width)  # moved by twice the interval's width
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, judges={"trait_llr_heldout": 0.9}, n_boot=500)
    v = _verdict(rep, "arm", "arm_placebo", "trait_llr_heldout")
    assert v["verdict"] == "better" and v["lo"] > 0
    arms, rows = _rows(shift_incoh=1.0)  # incoherence up: worse (lower is better)
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=500)
    assert _verdict(rep, "arm", "base", "incoh_ctx")["verdict"] == "worse"


def test_untrusted_judge_gives_no_verdict_and_pmass_drop_is_flagged():
    arms, rows = _rows(shift_trait=1.0)
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, judges={"trait_llr_heldout": 0.6}, n_boot=200)
    v = _verdict(rep, "arm", "base", "trait_llr_heldout")
    assert v["verdict"].startswith("not used") and "untrusted" in markdown(rep)
    for r in rows:
        if r["arm"] == "arm":
            r["items"]["mfv_pmass"] = [x * 0.5 for x in r["items"]["mfv_pmass"]]
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=200)
    assert rep.pmass_flag("arm") and not rep.pmass_flag("arm_placebo")
    assert "format shift" in _verdict(rep, "arm", "base", "trait_nats")["line"]
    # trait on the answering vignettes: the arm's halved pmass puts most rows under the base's median
    assert rep.values("arm", "trait_nats_answering").x[0].shape == (40, 7)
    assert np.isnan(rep.values("arm", "trait_nats_answering").x).any()


def test_primary_family_is_holm_adjusted_and_the_rest_exploratory():
    arms, rows = _rows(shift_trait=0.05)
    primary = [["arm", "arm_placebo", "trait_llr_heldout"], ["arm", "prompt", "trait_llr_heldout"],
               ["arm", "arm_placebo", "incoh_ctx"]]
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=200, primary=primary)
    vs = verdicts(rep)
    prim = [v for v in vs if v["family"] == "primary"]
    assert [(v["a"], v["b"], v["measure"]) for v in prim] == [tuple(q) for q in primary]
    assert [v["p_holm"] for v in prim] == pytest.approx(stats.holm([v["p"] for v in prim]))
    assert all(v["line"].startswith("[primary]") for v in prim)
    explo = [v for v in vs if v["family"] == "exploratory"]
    assert explo and not {(v["a"], v["b"], v["measure"]) for v in explo} & {tuple(q) for q in primary}
    md = markdown(rep)
    assert md.index("### Primary") < md.index("[primary] arm vs arm_placebo") < md.index("### Exploratory")
    # a declared question whose arms have not run stays in the family (p = 1): the adjustment does not shrink
    rep2 = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=200, primary=primary + [["nope", "arm", "incoh_ctx"]])
    prim2 = [v for v in verdicts(rep2) if v["family"] == "primary"]
    assert len(prim2) == 3 and [v["p_holm"] for v in prim2] == pytest.approx(
        stats.holm([v["p"] for v in prim] + [1.0])[:3])
    # a difference significant alone (p 0.02) but not after Holm (0.06): the primary line says not distinguishable,
    # the same difference as an exploratory line (unadjusted) says better
    from steer_heal.study.verdicts import line

    d = stats.Interval(0.2, 0.2 - 2.4 * 0.08, 0.2 + 2.4 * 0.08, se=0.08, df=1e6, n_seeds=3)
    assert 0.01 < d.p() < 0.05
    assert line(rep, "arm", "arm_placebo", "primary", "trait_llr_heldout", d, "primary", 0.06)["verdict"] == \
        "not distinguishable"
    assert line(rep, "arm", "arm_placebo", "primary", "trait_llr_heldout", d, "primary", d.p())["verdict"] == "better"
    assert line(rep, "arm", "arm_placebo", "x", "trait_llr_heldout", d, "exploratory", 0.06)["verdict"] == "better"


def test_named_families_are_holm_adjusted_each_on_its_own():
    arms, rows = _rows(shift_trait=0.05)
    for r in rows:  # the arm verbalises on every item, the prompt on none: lower is better, so 'worse'
        if r["arm"] in ("arm", "prompt"):
            r["items"]["verbalisation"] = [1.0 if r["arm"] == "arm" else 0.0] * 31 + [0.5]
    main = [["arm", "arm_placebo", "trait_llr_heldout"], ["arm", "prompt", "trait_llr_heldout"]]
    abl = [["arm", "arm_placebo", "incoh_ctx", "abl"], ["arm", "prompt", "verbalisation", "abl"],
           ["arm", "base", "trait_nats", "abl"]]
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=200, primary=main + abl)
    prim = [v for v in verdicts(rep) if v["family"] == "primary"]
    assert [(v["a"], v["b"], v["measure"], v["group"]) for v in prim] == [tuple(q[:3]) + (q[3] if len(q) > 3 else "",)
                                                                          for q in main + abl]
    un, named = prim[:2], prim[2:]
    # each family adjusted alone, as if the other were not declared: Holm over 2 and Holm over 3
    assert [v["p_holm"] for v in un] == pytest.approx(stats.holm([v["p"] for v in un]))
    assert [v["p_holm"] for v in named] == pytest.approx(stats.holm([v["p"] for v in named]))
    assert all(v["line"].startswith("[primary:abl]") for v in named) and un[0]["line"].startswith("[primary]")
    # a measure outside the verdict set (verbalisation) gets its direction: lower is better
    verb = named[1]
    assert verb["measure"] == "verbalisation" and verb["verdict"] == "worse" and verb["lo"] > 0


def test_declared_expectations_are_read_against_the_verdicts():
    from steer_heal.study.measures import against_expectation

    table = {("better", "better"): "supported", ("better", "not distinguishable"): "not supported",
             ("better", "worse"): "contradicted", ("worse", "worse"): "supported", ("worse", "better"): "contradicted",
             ("not worse", "not distinguishable"): "supported", ("not worse", "better"): "supported",
             ("not worse", "worse"): "contradicted", ("better", "no verdict (n = 2 < 3 seeds)"): "no verdict"}
    assert {k: against_expectation(*k) for k in table} == table
    arms, rows = _rows(shift_trait=1.0)  # the arm far above its placebo on the trait
    primary = [["arm", "arm_placebo", "trait_llr_heldout", "x", "better"],
               ["arm", "arm_placebo", "trait_llr_heldout", "y", "worse"], ["arm", "prompt", "incoh_ctx", "x"]]
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=200, primary=primary)
    prim = [v for v in verdicts(rep) if v["family"] == "primary"]
    assert prim[0]["verdict"] == "better" and prim[0]["expect_result"] == "supported"
    assert prim[0]["line"].endswith("(expected better: supported)")
    assert prim[1]["expect_result"] == "contradicted" and "expect" not in prim[2]


def test_report_references_each_trained_arm_to_its_controls():
    arms, rows = _rows()
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, pairs=[["arm", "prompt"]], n_boot=100)
    qs = rep.questions()
    assert ("arm", "base", "base") in qs and ("arm", "prompt", "prompt") in qs
    assert ("arm", "arm_placebo", "placebo") in qs and ("arm", "prompt", "pair") in qs
    assert not any(a == "arm_placebo" for a, _, _ in qs)  # a placebo is a reference, not a subject


def test_t_interval_equals_the_textbook_formula():
    iv = stats.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert iv.value == 2.0 and iv.hi - 2.0 == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    one = stats.t_interval([5.0])  # one seed: a value, no interval, never a verdict
    assert one.value == 5.0 and math.isnan(one.lo) and not one.excludes_zero() and one.fmt("{:.1f}") == "5.0 [n=1]"
    # Student's t 97.5% quantiles from a printed table (df 1, 2, 3, 5, 10, 30)
    for df, q in [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042)]:
        assert stats.tq(df) == pytest.approx(q, abs=6e-4)


def test_drift_table_is_the_mean_over_seeds_per_round(tmp_path):
    arms = [SimpleArm("base", "base"), SimpleArm("rmse", "iterative"), SimpleArm("none", "online"),
            SimpleArm("rmse_placebo", "iterative", "placebo", "rmse")]
    rows = [dict(arm="base", kind="base", seed=None, items={})]
    for s in (1, 2):
        rows.append(dict(arm="rmse_placebo", kind="iterative", seed=s, items={}, rounds=[
            dict(round=k, coh_healed=0.9) for k in range(2)]))
        rows.append(dict(arm="rmse", kind="iterative", seed=s, items={}, rounds=[
            dict(round=k, coh_healed=1.0 - 0.1 * k * s, barrier_active_frac=0.5, D_rmse=0.2 * s,
                 gen_tokens=1000 * (k + 1) + 10 * s, trait_heldout_healed=0.1 + 0.05 * k * s) for k in range(3)]))
        rows.append(dict(arm="none", kind="online", seed=s, items={}, rounds=[
            dict(bake=k, coherence=0.9, repetition=0.1 * k) for k in range(2)]))
    rep = Study("t", "m/x", "p", 0, arms, rows, AXIS, n_boot=10)
    series = dict(rep.drift_series("rmse", "coherent"))
    assert series[2].value == pytest.approx(1.0 - 0.1 * 2 * 1.5)  # round 2: mean of 0.8 and 0.6
    assert series[2].hi - series[2].value == pytest.approx(12.706205 * statistics.stdev([0.8, 0.6]) / math.sqrt(2),
                                                           rel=1e-6)
    assert dict(rep.drift_series("none", "repetition"))[1].value == pytest.approx(0.1)
    md = drift_markdown(rep)
    assert "| rmse | 2 | 2 |" in md and "| none | 1 | 2 |" in md and "| rmse_placebo | 1 | 2 |" in md
    look = drift_look(rep.drift_arms())  # a placebo: its arm's colour, dotted; online dashed; steered solid
    assert look["rmse_placebo"]["colour"] == look["rmse"]["colour"] != look["none"]["colour"]
    assert look["rmse"]["dash"] == [] and look["rmse_placebo"]["dash"] and look["none"]["dash"]
    assert look["rmse_placebo"]["dash"] != look["none"]["dash"]
    drift_figure(rep, tmp_path)
    assert (tmp_path / "drift.png").exists()
    page = (tmp_path / "drift.html").read_text()
    assert "data:image/png;base64," in page and "<script" not in page  # the PNG, embedded
    assert "| rmse_placebo |" not in page and "rmse_placebo" in page  # and its numbers as an HTML table
    # x is the generated tokens at each round (mean over seeds), the round index where a run logged none
    data = drift_data(rep, rep.drift_arms())
    assert [p[0] for p in data["rmse"]["coherent"]] == pytest.approx([1015.0, 2015.0, 3015.0])
    assert [p[0] for p in data["none"]["repetition"]] == [0, 1]
    # Q3: the last round's held-out trait minus the first, per seed (0.1 and 0.2), t-interval over the seeds
    climb = rep.trait_climb("rmse")
    assert climb.value == pytest.approx(0.15) and climb.hi - 0.15 == pytest.approx(
        12.706205 * statistics.stdev([0.1, 0.2]) / math.sqrt(2), rel=1e-6)
    assert rep.trait_climb("none") is None  # its bakes logged no trait
    q3 = [x for x in answers(rep) if x["question"] == "Q3"]
    assert [x["arm"] for x in q3] == ["rmse"] and "Q3 keeps moving" in markdown(rep)


def test_on_curve_interpolates_in_dose_order_and_never_extrapolates():
    from steer_heal.study.measures import on_curve

    X, Y = [1.0, 2.0, 1.5], [0.0, 1.0, 2.0]  # the third dose turns back in x: the first segment holding x wins
    assert on_curve(1.5, X, Y) == pytest.approx(0.5)
    assert on_curve(1.75, X, Y) == pytest.approx(0.75)  # on the first segment, not the third's 2 - 0.5 * 2
    assert math.isnan(on_curve(0.5, X, Y)) and math.isnan(on_curve(2.5, X, Y))


def test_heal_gain_and_retention_by_hand():
    """Base at (incoh 1, trait 0), raw steering (kappa 2) at (2, 1): an arm at incoh 1.5 with trait 0.8 sits 0.3
    above the curve; generated at mean dose 1 (raw steering's trait there: 0.5) it keeps 0.8 / 0.5 = 1.6 of it."""
    n = 32

    def items(inc, llr, noise=0.0, s=0):
        r = np.random.default_rng(s)
        return dict(incoh_ctx=list(inc + r.normal(0, noise, n)), trait_llr_heldout=list(llr + r.normal(0, noise, n)))

    rows = [dict(arm="base", kind="base", seed=None, items=items(1.0, 0.0)),
            dict(arm="steer", kind="steer", seed=None, target_kl=2.0, kappa=2.0, items=items(2.0, 1.0))]
    rows += [dict(arm="arm", kind="online", seed=s, doses=[[0.5], [1.5]], items=items(1.5, 0.8)) for s in (1, 2, 3)]
    arms = [SimpleArm("base", "base"), SimpleArm("steer", "steer"), SimpleArm("arm", "online")]
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=200)
    g = heal_gain(rep, "arm")
    assert g.value == pytest.approx(0.3) and g.lo == pytest.approx(0.3) and g.hi == pytest.approx(0.3)
    assert retention(rep, "arm") == pytest.approx(1.6)
    row = "| arm | 1.500 [1.500, 1.500] | +0.800 [+0.800, +0.800] | +0.300 [+0.300, +0.300] | 1 | 1.60 |"
    assert row in heal_markdown(rep)
    # with noise, per seed and per item: the interval widens and still holds the truth
    rows = rows[:2] + [dict(arm="arm", kind="online", seed=s, doses=[[1.0]], items=items(1.5, 0.8, 0.05, s))
                       for s in (1, 2, 3)]
    g = heal_gain(Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=300), "arm")
    assert g.lo < 0.3 < g.hi and g.hi - g.lo > 0.01 and g.n_seeds == 3
    # a seed less incoherent than anything on the curve (0.5 < base's 1.0) has no gain: the other two carry the
    # value (0.3 and 0.5 above the curve: mean 0.4) and the seed part, and the line says 2 of 3
    rows = rows[:2] + [dict(arm="arm", kind="online", seed=s, doses=[[1.0]], items=items(inc, llr))
                       for s, inc, llr in ((1, 1.5, 0.8), (2, 1.5, 1.0), (3, 0.5, 0.0))]
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=50)
    g = heal_gain(rep, "arm")
    half = 12.706205 * statistics.stdev([0.3, 0.5]) / math.sqrt(2)
    assert g.value == pytest.approx(0.4) and g.n_seeds == 2 and g.hi - 0.4 == pytest.approx(half, rel=1e-6)
    q1 = next(x for x in answers(rep) if x["question"] == "Q1")
    assert q1["line"].endswith("(2 of 3 seeds inside the dose curve)")
    # one seed: its interval spans the items alone, and the answer line says so
    one = rows[:2] + [dict(arm="arm", kind="online", seed=1, doses=[[1.0]], items=items(1.5, 0.8, 0.05, 1))]
    q1 = next(x for x in answers(Study("t", "m", "p", 0, arms, one, AXIS, n_boot=50)) if x["question"] == "Q1")
    assert q1["n_seeds"] == 1 and q1["hi"] > q1["lo"] and q1["line"].endswith("] (1 seed: items only)")


def test_mfv_transfer_reads_a_known_share_of_the_steered_pattern():
    """An arm whose answer distributions are base x exp(0.5 delta) carries exactly half of steering's pattern
    (base x exp(delta)): projection 0.5 over all foundations, and half of steering's mean shift on the axis;
    its placebo, at base, carries none and is read against the same steering point."""
    rng = np.random.default_rng(0)
    base = rng.dirichlet(np.ones(7) * 5, size=40)
    delta = rng.normal(0, 0.5, (40, 7))

    def dist(k):
        q = base * np.exp(k * delta)
        return (q / q.sum(1, keepdims=True)).tolist()

    steer = SimpleArm("steer_kl1", "steer")
    steer.target_kl = 1.0
    arms = [SimpleArm("base", "base"), steer, SimpleArm("arm", "online"), SimpleArm("arm_placebo", "online",
                                                                                   "placebo", "arm")]
    rows = [dict(arm="base", kind="base", seed=None, items=dict(mfv_p=base.tolist())),
            dict(arm="steer_kl1", kind="steer", seed=None, kappa=1.0, items=dict(mfv_p=dist(1.0)))]
    for s in (1, 2, 3):
        rows.append(dict(arm="arm", kind="online", seed=s, doses=[[1.1]], items=dict(mfv_p=dist(0.5))))
        rows.append(dict(arm="arm_placebo", kind="online", seed=s, doses=[[0.0]], items=dict(mfv_p=base.tolist())))
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=10)
    clr = delta - delta.mean(1, keepdims=True)  # steering's centred log-ratio shift, by hand
    axis = float((clr[:, 0] - clr[:, 3]).mean() / 2)  # Care +1, Authority -1
    t = mfv_transfer(rep, "arm")
    assert t["ref"] == "steer_kl1" and t["all"].value == pytest.approx(0.5, abs=1e-6)
    assert t["ref_axis"] == pytest.approx(axis, abs=1e-6) and t["axis"].value == pytest.approx(axis / 2, abs=1e-6)
    p = mfv_transfer(rep, "arm_placebo")
    assert p["ref"] == "steer_kl1" and p["all"].value == pytest.approx(0.0, abs=1e-6)
    assert "## MFV transfer" in mfv_transfer_markdown(rep)


def test_a_measure_constant_in_both_arms_is_untestable_not_a_null():
    # a reward ablation whose penalty never fired: verbalisation is 0 on every item of both arms, so
    # 'not distinguishable' (a measured null) would mislead; one nonzero item makes it a question again
    arms, rows = _rows(shift_trait=0.5)
    for r in rows:
        r["items"]["verbalisation"] = [0.0] * len(r["items"]["verbalisation"])
    primary = [["arm", "arm_placebo", "verbalisation", "abl", "worse"]]
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=100, primary=primary)
    v = next(v for v in verdicts(rep) if v["family"] == "primary")
    assert v["verdict"] == "untestable (verb = 0 on every item of both arms)"
    assert v["expect_result"] == "untestable" and v["line"].endswith("(expected worse: untestable)")
    for r in rows:  # the arm now verbalises on every item (its placebo on one): a question with an answer
        if r["arm"] == "arm":
            r["items"]["verbalisation"] = [1.0] * len(r["items"]["verbalisation"])
    next(r for r in rows if r["arm"] == "arm_placebo")["items"]["verbalisation"][3] = 1.0
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=100, primary=primary)
    v = next(v for v in verdicts(rep) if v["family"] == "primary")
    assert v["verdict"] == "worse" and v["value"] > 0.9 and v["expect_result"] == "supported"


def test_seeds_only_t_equals_scipy_on_per_seed_means():
    """The fragility check's second method: per-seed differences, a t test with df S-1 (scipy as reference),
    paired by seed when both arms ran the same seeds, against an untrained arm's single value otherwise."""
    import numpy as np
    from scipy import stats as sps

    from steer_heal import stats

    rng = np.random.default_rng(7)
    xa = rng.normal(0.3, 1.0, size=(3, 20))
    xb = rng.normal(0.0, 1.0, size=(3, 20))
    a, b = stats.Values(xa, seeds=(1, 2, 3)), stats.Values(xb, seeds=(1, 2, 3))
    d = stats.seeds_t(a, b)
    ref = sps.ttest_rel(xa.mean(1), xb.mean(1))
    assert d.value == pytest.approx(float((xa.mean(1) - xb.mean(1)).mean()))
    assert d.p() == pytest.approx(ref.pvalue) and d.df == 2
    base = stats.Values(xb[:1])  # untrained: one value
    d1 = stats.seeds_t(a, base)
    assert d1.p() == pytest.approx(sps.ttest_1samp(xa.mean(1) - xb[0].mean(), 0.0).pvalue)


@pytest.mark.parametrize("study", ["smollm2_cpu", "smollm2_drift", "smollm2_leash_confirm"])
def test_committed_primary_lines_carry_the_seeds_only_test(study):
    """Every primary line with a usable p carries the seeds-only p, Holm-adjusted within its family as the main
    p is (recomputed here from the file), and says FRAGILE exactly where the two verdicts differ."""
    from pathlib import Path

    from steer_heal import stats

    v = json.loads((Path(__file__).resolve().parents[1] / "docs/studies" / study / "verdicts.json").read_text(),
                   parse_constant=lambda c: float(c))
    prim = [x for x in v if x["family"] == "primary"]
    with_t = [x for x in prim if "p_seeds" in x]
    assert with_t, study
    fams: dict = {}
    for x in with_t:
        fams.setdefault(x.get("group", ""), []).append(x)
    for group, xs in fams.items():
        n_declared = len([x for x in prim if x.get("group", "") == group])
        if len(xs) == n_declared:  # the whole family ran: its Holm adjustment is recomputable from the file
            got = stats.holm([x["p_seeds"] if x["verdict"] in ("better", "worse", "not distinguishable") else 1.0
                              for x in xs])
            assert [x["p_holm_seeds"] for x in xs] == pytest.approx(got), group
    for x in with_t:
        assert x["fragile"] == (x["verdict"] != x["verdict_seeds"])
        assert ("FRAGILE" in x["line"]) == x["fragile"]


def test_a_run_that_stopped_early_is_named_with_its_reason(tmp_path):
    """A seed with fewer rounds than its arm's others, or whose own log says it stopped, gets a line in compare.md
    with its round count and the reason its events.jsonl gives; a run that went to its end gets none."""
    from steer_heal.study.arms import stop_reason
    from steer_heal.study.tables import short_runs_markdown

    (tmp_path / "events.jsonl").write_text(
        json.dumps(dict(event="stop_budget", round=1)) + "\n"  # the budget: the study's planned end, not early
        + json.dumps(dict(event="stop_filter_starved", round=6, kept=3, generated=40, min_train=8)) + "\n")
    assert stop_reason(tmp_path) == "the filter kept fewer than min_train at round 6"
    assert stop_reason(tmp_path / "missing") == ""
    arms = [SimpleArm("base", "base"), SimpleArm("a", "iterative"), SimpleArm("b", "online")]
    rows = [dict(arm="base", kind="base", seed=None, items={})]
    for s in (1, 2, 3):
        n = 6 if s == 2 else 8
        rows.append(dict(arm="a", kind="iterative", seed=s, items={}, rounds=[dict(round=k) for k in range(n)],
                         stopped=stop_reason(tmp_path) if s == 2 else ""))
        rows.append(dict(arm="b", kind="online", seed=s, items={}, rounds=[dict(bake=k) for k in range(2)],
                         **({"stopped": ""} if s != 3 else {})))  # a row from before rows carried the reason
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=10)
    assert rep.short_runs() == [("a", 2, 6, 8, "the filter kept fewer than min_train at round 6")]
    md = short_runs_markdown(rep)
    assert "- a seed 2: 6 of 8 rounds / bakes; the filter kept fewer than min_train at round 6" in md
    assert "seed 1" not in md and "- b" not in md and "## Runs that stopped early" in markdown(rep)
    rows[-1]["rounds"] = rows[-1]["rounds"][:1]  # b at seed 3: one bake of two, no reason recorded
    md = short_runs_markdown(Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=10))
    assert "- b seed 3: 1 of 2 rounds / bakes; the reason is not in its row" in md


def test_a_pair_states_what_each_side_trained_on():
    """The matched table: per pair, each side's tokens generated and trained on, optimizer steps and lr sum
    (totals over rounds, mean over seeds) and the residual of the first against the second, hand-computed."""
    from steer_heal.study.tables import matched_markdown

    arms = [SimpleArm("base", "base"), SimpleArm("on", "online"), SimpleArm("it", "iterative")]
    rows = [dict(arm="base", kind="base", seed=None, items={})]
    for s in (1, 2):
        rows.append(dict(arm="on", kind="online", seed=s, items={}, gen_tokens=4000 + s, doses=[[1.41, 2.83]] * 2,
                         rounds=[dict(bake=k, trained_tokens=1000 + 100 * s, opt_steps=6, lr_sum=1e-3)
                                 for k in range(2)]))
        rows.append(dict(arm="it", kind="iterative", seed=s, items={}, gen_tokens=4000, doses=[[1.41, 2.83]] * 2,
                         rounds=[dict(round=k, trained_tokens=1600, opt_steps=9, lr_sum=7.5e-4) for k in range(2)]))
    rep = Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=10, pairs=[["on", "it"]])
    sp = rep.spend("on")
    assert sp["trained_tokens"] == pytest.approx(2 * 1150) and sp["opt_steps"] == 12 and sp["lr_sum"] == 2e-3
    md = matched_markdown(rep)
    # trained: 2300 vs 3200 -> -28%; steps 12 vs 18 -> -33%; lr 0.002 vs 0.0015 -> +33%; tokens 4002 vs 4000 -> +0%
    assert ("| on vs it | 4002 vs 4000 (+0%) | 2300 vs 3200 (-28%) | 12.0 vs 18.0 (-33%) | 0.002 vs 0.0015 (+33%) |"
            in md)
    assert "[1.41, 2.83] vs [1.41, 2.83]" in md
    # no per-round generated tokens: a dash; doses from the row's per-round list (rows written before records)
    assert "| on | 0 | - | 1100-1200 | 6 | 0.001 | [1.41, 2.83] |" in md
    # per round / bake, range over seeds: a bake's generated tokens are its running total minus the one before
    for s, r in ((1, rows[1]), (2, rows[3])):
        for k, b in enumerate(r["rounds"]):
            b.update(gen_tokens=(k + 1) * 2000 + (s if k else 0), doses=[1.41, 2.83])
    for k, b in enumerate(rows[2]["rounds"] + rows[4]["rounds"]):
        b.update(gen_tokens=(k % 2 + 1) * 2000, doses=[1.41, 2.83], opt_steps=9 if k != 3 else 8)
    md = matched_markdown(Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=10, pairs=[["on", "it"]]))
    assert "| on | 0 | 2000 | 1100-1200 | 6 | 0.001 | [1.41, 2.83] |" in md
    assert "| on | 1 | 2001-2002 | 1100-1200 | 6 | 0.001 | [1.41, 2.83] |" in md  # 4001 - 2000, 4002 - 2000
    assert "| it | 1 | 2000 | 1600 | 8-9 | 0.00075 | [1.41, 2.83] |" in md
    del rows[1]["rounds"][0]["lr_sum"]  # a run that did not record it: no number, not a wrong one
    assert Study("t", "m", "p", 0, arms, rows, AXIS, n_boot=10, pairs=[["on", "it"]]).spend("on")["lr_sum"] is None
