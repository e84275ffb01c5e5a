import math
import random

import pytest
import torch

from steer_heal.chat import encode_prompt, render_prompt
from steer_heal.config import HealConfig
from steer_heal.heal import HealDivergedError, heal_round, heal_terms, round_lam
from steer_heal.logprobs import pack
from steer_heal.student import Student


def examples(tok, n=8):
    out = []
    for i in range(n):
        p = encode_prompt(tok, render_prompt(tok, f"question number {i} " + "more " * (i % 3)))
        c = tok(
            f" answer {i} is that we look after each other" + " kindly" * (i % 4), add_special_tokens=False
        ).input_ids
        out.append((p, c + [tok.eos_token_id]))
    return out


def student(tiny):
    return Student(tiny.model, tiny.tokenizer, r=4, alpha=8, band=(0.0, 1.0), base_path=tiny.path)


def test_heal_terms_nll_matches_naive_and_zero_kl_at_start(tiny):
    st = student(tiny)
    ex = examples(tiny.tokenizer, 4)
    batch = pack([e[0] for e in ex], [e[1] for e in ex], tiny.tokenizer.pad_token_id)
    cfg = HealConfig()
    nll, D, bar, k, kl = heal_terms(st, batch, cfg, st.live_off)
    # naive: one unpadded sequence at a time, full logits, float64
    tot, n = 0.0, 0
    with torch.no_grad():
        for p, c in ex:
            ids = torch.tensor([p + c])
            lp = torch.log_softmax(st.model(input_ids=ids).logits.double()[0], -1)
            for t in range(len(p), len(p) + len(c)):
                tot -= float(lp[t - 1, ids[0, t]])
                n += 1
    assert k == n == sum(len(e[1]) for e in ex)
    assert float(nll.detach()) == pytest.approx(tot / n, abs=1e-4)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)  # B = 0: student == reference
    assert torch.allclose(D, torch.full_like(D, 1e-4), atol=1e-6)  # sqrt(0 + eps)
    assert float(bar.sum()) == 0.0


def test_heal_round_lowers_nll_and_logs(tiny):
    st = student(tiny)
    cfg = HealConfig(epochs=4, batch_size=4, lr=5e-3, log_every=1, val_frac=0.25)
    res = heal_round(st, examples(tiny.tokenizer, 16), cfg, progress=False)
    assert res.val_nll < res.val_nll_before
    assert res.steps == 4 * 3 and res.log
    row = res.log[0]
    assert {"nll", "D", "grad_nll", "grad_barrier", "barrier_frac"} <= set(row)
    assert res.D_mean > 1e-4  # the adapter moved the student off the reference
    assert len(res.log) == res.steps  # log_every 1: a row per step
    # the summed learning rate of its 12 steps, by hand: warm-up int(0.1 * 12) = 1 step at 0, then cosine
    # 0.5 * (1 + cos(pi * (i - 1) / 11)) x 5e-3 for steps i = 1..11
    want = sum(5e-3 * 0.5 * (1 + math.cos(math.pi * (i - 1) / 11)) for i in range(1, 12))
    assert res.lr_sum == pytest.approx(want, rel=1e-9)
    # tokens trained on: every epoch's pass over the 12 training examples' target tokens
    ex = examples(tiny.tokenizer, 16)
    random.Random(0).shuffle(ex)  # heal_round's own split (seed 0): the first 4 are validation
    assert res.tokens == 4 * sum(len(c) for _, c in ex[4:])
    st.reset_live()
    quiet = heal_round(st, examples(tiny.tokenizer, 16), HealConfig(epochs=1, batch_size=4, log_every=0,
                                                                    val_frac=0.25), progress=False)
    assert quiet.steps == 3 and quiet.log == []  # log_every 0: none (no gradient-norm passes)


def test_barrier_pulls_toward_reference(tiny, tiny_dir):
    """Same data and seed: a strong barrier ends closer to the reference than none."""
    from steer_heal.models import load_model

    D_end = {}
    for lam in (0.0, 50.0):
        st = Student(load_model(tiny.path, dtype="float32").model, tiny.tokenizer, r=4, alpha=8, band=(0.0, 1.0))
        torch.manual_seed(0)
        st.reset_live()
        cfg = HealConfig(epochs=4, batch_size=4, lr=1e-2, kl_beta=lam, kl_tau=0.0, val_frac=0.0)
        ex = examples(tiny.tokenizer, 12)
        heal_round(st, ex, cfg, progress=False, seed=1)
        batch = pack([e[0] for e in ex], [e[1] for e in ex], tiny.tokenizer.pad_token_id)
        with torch.no_grad():
            D_end[lam] = float(heal_terms(st, batch, cfg, st.live_off)[1].mean())
    assert D_end[50.0] < 0.7 * D_end[0.0], D_end


def test_nan_loss_raises(tiny):
    st = student(tiny)
    cfg = HealConfig(epochs=3, batch_size=4, lr=1e30, warmup_ratio=0.0, max_grad_norm=1e30)
    with pytest.raises(HealDivergedError, match="fix"):
        heal_round(st, examples(tiny.tokenizer, 8), cfg, progress=False)


def test_lam_decay():
    assert round_lam(0.3, 0, -0.5) == 0.3
    assert round_lam(0.3, 3, -0.5) == pytest.approx(0.15)
    assert math.isclose(round_lam(0.3, 5, 0.0), 0.3)


def test_round_logs_D_per_aggregate_and_barrier_active_fraction_by_hand(tiny):
    """With lr 0 the student is the same at every step, so the round's logged D under each aggregate
    (mean over its training sequences) and the fraction of sequences over tau equal a float64 hand
    computation of KL(student || base) per sequence; the round row carries them."""
    import numpy as np

    from steer_heal.loop import round_row

    st = student(tiny)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a baked history, so the student differs from the base reference
        for m in st.layers.values():
            m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.3)
    st.bake()
    ex = examples(tiny.tokenizer, 6)  # under 8 examples: no validation split, every one trains
    per_seq = []
    with torch.no_grad():
        for p, c in ex:
            ids = torch.tensor([p + c])
            ls = torch.log_softmax(st.model(input_ids=ids).logits.double()[0], -1)
            with st.base():
                lb = torch.log_softmax(st.model(input_ids=ids).logits.double()[0], -1)
            kl = [float((ls[t].exp() * (ls[t] - lb[t])).sum()) for t in range(len(p) - 1, len(p) + len(c) - 1)]
            per_seq.append(np.array(kl))
    want = dict(mean=np.mean([k.mean() for k in per_seq]),
                rmse=np.mean([math.sqrt((k ** 2).mean() + 1e-8) for k in per_seq]),
                p95=np.mean([np.percentile(k, 95) for k in per_seq]), max=np.mean([k.max() for k in per_seq]))
    rmse = sorted(math.sqrt((k ** 2).mean() + 1e-8) for k in per_seq)
    tau = (rmse[1] + rmse[2]) / 2  # two of six sequences under tau
    cfg = HealConfig(kl_reference="base", kl_agg="rmse", kl_tau=tau, lr=0.0, epochs=2, batch_size=4, log_every=1)
    res = heal_round(st, ex, cfg, progress=False)
    assert min(want.values()) > 1e-3
    for a, x in want.items():
        assert res.D_by_agg[a] == pytest.approx(x, rel=1e-4), a
    assert res.active_frac == pytest.approx(4 / 6)
    assert want["max"] > want["p95"] > want["mean"] and want["rmse"] > want["mean"]
    row = round_row(0, 1.0, [], [], 0, res, *[dict(trait=0, coherence=1, incoherence=0, tail_nll=0, repetition=0)] * 2,
                    None, None, None, {}, 1.0, 0.0)
    assert row["barrier_active_frac"] == res.active_frac and row["D_rmse"] == res.D_by_agg["rmse"]
    assert row["D_mean"] == res.D_by_agg["mean"] and row["D_p95"] == res.D_by_agg["p95"]
