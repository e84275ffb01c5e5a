"""What the online reward teaches (issue 43): advantages (sum | per_term), the reward diagnostics, the
off-policy correction of the policy term, per-term gradient norms and the carried-vector check, each
against a recomputation done another way (naive loops, float64, separate backward passes)."""
import json
import math
import os
import random

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _helpers import rmse_kl_penalty, trl_batch  # noqa: E402

from steer_heal.grpo.advantage import (  # noqa: E402
    advantage_parts,
    advantages,
    centred,
    dose_correlation,
    policy_terms,
    reward_diagnostics,
    sequence_mean_loss,
)
from steer_heal.student import Student  # noqa: E402


def _groups(n_groups, G, seed=0, K=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_groups * G, K, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ advantages and diagnostics (plain tensors)
def _naive_adv(rows, G, weights, norm, scale=True):
    """TRL's group advantage (sum) or the GDPO one (per_term), by explicit loops in Python floats."""
    out = []
    for g0 in range(0, len(rows), G):
        grp = rows[g0:g0 + G]
        if norm == "sum":
            R = [sum(r) for r in grp]
        else:
            R = [0.0] * G
            for k in range(len(grp[0])):
                col = [r[k] for r in grp]
                mu = sum(col) / G
                sd = math.sqrt(sum((c - mu) ** 2 for c in col) / (G - 1))
                for i in range(G):
                    R[i] += abs(weights[k]) * ((col[i] - mu) / sd if sd > 1e-12 else 0.0)
        mu = sum(R) / G
        sd = math.sqrt(sum((x - mu) ** 2 for x in R) / (G - 1))
        out += [(x - mu) / (sd + 1e-4) if scale else x - mu for x in R]
    return out


@pytest.mark.parametrize("norm", ["sum", "per_term"])
def test_advantages_equal_a_naive_loop(norm):
    r = _groups(5, 4)
    r[8:12, 1] = 0.7  # one component constant in one group: z = 0 there, not a division by 0
    w = [1.0, -0.25, 2.0]
    for scale in (True, False):
        got = advantages(r, w, 4, norm, scale)
        assert got.tolist() == pytest.approx(_naive_adv(r.tolist(), 4, w, norm, scale), abs=1e-9)


def test_sum_advantages_equal_trls_own(tiny, tmp_path):
    """reward_norm sum is TRL's advantage: the trainer's own output on a real generation batch."""
    from test_objectives import _steered_setup, _trainer

    st, state, rollout, scorer = _steered_setup(tiny)
    noisy = lambda prompts, completions, **k: [float(len(c)) for c in completions]  # noqa: E731
    tr = _trainer(tiny, st, tmp_path, objective="grpo", rollout=rollout, reward=noisy, steer_state=state,
                  scorer=scorer)
    inputs = tr._generate_and_score_completions([tr.train_dataset[i] for i in (0, 0, 1, 1)])
    want = advantages(tr._rewards.double(), [1.0], 2, "sum")
    assert inputs["advantages"].double().tolist() == pytest.approx(want.tolist(), abs=1e-5)


def test_per_term_lets_a_small_variance_term_move_the_advantage():
    """A term whose spread is 1% of another's barely ranks the group under sum; standardised per term
    (GDPO) it ranks it as much as its weight says."""
    rng = random.Random(0)
    G, n = 4, 64
    tiny_term = [0.01 * (i % 2) for i in range(n)]  # the signal: half of each group is better by 0.01
    loud = [rng.gauss(0, 1) for _ in range(n)]  # noise with sd 1
    r = torch.tensor([[a, b] for a, b in zip(loud, tiny_term)], dtype=torch.float64)
    t = torch.tensor(tiny_term, dtype=torch.float64)
    corr = {norm: dose_correlation(advantages(r, [1.0, 1.0], G, norm), t, G) for norm in ("sum", "per_term")}
    assert abs(corr["sum"]) < 0.1
    assert corr["per_term"] > 0.5
    shares = reward_diagnostics(r, ["loud", "tiny"], G)
    assert shares["tiny/share"] < 0.01  # what the diagnostics report for it under sum
    # under per_term the shares describe what the advantage sums: the standardised terms, equal weights
    parts = advantage_parts(r, [1.0, 1.0], G, "per_term")
    shares = reward_diagnostics(r, ["loud", "tiny"], G, parts)
    assert 0.3 < shares["tiny/share"] < 0.7 and shares["loud/share"] + shares["tiny/share"] == pytest.approx(1.0)


def test_advantage_parts_per_term_equal_a_naive_loop():
    G = 4
    r = _groups(5, G, seed=7)
    r[4:8, 1] = 0.5  # a component with no spread in one group: its z is 0 there
    w = [2.0, -0.5, 1.0]
    parts = advantage_parts(r, w, G, "per_term").tolist()
    rows = r.tolist()
    for g0 in range(0, len(rows), G):
        for k in range(3):
            col = [rows[i][k] for i in range(g0, g0 + G)]
            mu = sum(col) / G
            sd = math.sqrt(sum((c - mu) ** 2 for c in col) / (G - 1))
            for j, c in enumerate(col):
                want = abs(w[k]) * (c - mu) / sd if sd > 1e-12 else 0.0
                assert parts[g0 + j][k] == pytest.approx(want)
    # the advantage is built from exactly these parts
    R = torch.tensor(parts, dtype=torch.float64).sum(1)
    assert advantages(r, w, G, "per_term", scale=False).tolist() == pytest.approx(centred(R, G).tolist())
    assert advantage_parts(r, w, G, "sum").tolist() == rows


def test_per_term_advantages_reach_the_trainer(tiny, tmp_path):
    from test_objectives import _steered_setup, _trainer

    st, state, rollout, scorer = _steered_setup(tiny)
    loud = lambda prompts, completions, completion_ids, **k: [100.0 * sum(c) for c in completion_ids]  # noqa: E731
    quiet = lambda prompts, completions, **k: [0.001 * (i % 2) for i in range(len(completions))]  # noqa: E731
    loud.__name__, quiet.__name__ = "loud", "quiet"
    quiet.weight = -2.0  # a penalty of weight 2: |w| weighs the standardised term
    adv = {}
    for norm in ("sum", "per_term"):
        from trl import GRPOConfig

        from steer_heal.config import RunConfig
        from steer_heal.grpo.objective import KLPenalty, Objective
        from steer_heal.grpo.trainer import SteerHealGRPOTrainer

        base = _trainer(tiny, st, tmp_path / norm, objective="grpo", rollout=rollout, steer_state=state, scorer=scorer)
        tr = SteerHealGRPOTrainer(model=st.model, reward_funcs=[loud, quiet], args=base.args,
                                  train_dataset=base.train_dataset, processing_class=tiny.tokenizer, student=st,
                                  kl=KLPenalty.from_config(RunConfig().heal, beta=0.0),
                                  objective=Objective.from_config(RunConfig().online, name="grpo", reward_norm=norm),
                                  rollout_func=rollout, steer_state=state, scorer=scorer)
        assert isinstance(tr.args, GRPOConfig)
        inputs = tr._generate_and_score_completions([tr.train_dataset[i] for i in (0, 0, 1, 1)])
        adv[norm] = inputs["advantages"].double()
        if norm == "per_term":
            assert adv[norm].tolist() == pytest.approx(
                _naive_adv(tr._rewards.double().tolist(), 2, [1.0, 2.0], "per_term"), abs=1e-5)
    # in each group of 2: under sum the 100x term decides the order; per term the quiet one (weight 2 > 1) does
    loud_r, quiet_r = tr._rewards[:, 0].tolist(), tr._rewards[:, 1].tolist()
    differ = [i for i in (0, 2) if loud_r[i] != loud_r[i + 1]]
    assert differ  # sampled replies of different lengths: the loud term has a spread
    for i in differ:
        assert (adv["sum"][i + 1] > adv["sum"][i]) == (loud_r[i + 1] > loud_r[i])
    for i in (0, 2):
        assert (adv["per_term"][i + 1] > adv["per_term"][i]) == (quiet_r[i + 1] > quiet_r[i])


def test_reward_diagnostics_equal_a_naive_loop():
    G = 4
    r = _groups(6, G, seed=3)
    r[4:8, :] = 1.0  # a group whose summed reward has sd 0
    d = reward_diagnostics(r, ["a", "b", "c"], G)
    rows = r.tolist()
    cov = [0.0, 0.0, 0.0]
    var = 0.0
    zero = 0
    for g0 in range(0, len(rows), G):
        grp = rows[g0:g0 + G]
        R = [sum(x) for x in grp]
        mR = sum(R) / G
        zero += all(abs(x - mR) < 1e-12 for x in R)
        var += sum((x - mR) ** 2 for x in R)
        for k in range(3):
            mk = sum(x[k] for x in grp) / G
            cov[k] += sum((x[k] - mk) * (Ri - mR) for x, Ri in zip(grp, R))
    for k, name in enumerate("abc"):
        col = [x[k] for x in rows]
        mu = sum(col) / len(col)
        assert d[f"{name}/mean"] == pytest.approx(mu)
        assert d[f"{name}/sd"] == pytest.approx(math.sqrt(sum((c - mu) ** 2 for c in col) / len(col)))
        assert d[f"{name}/share"] == pytest.approx(cov[k] / var)
    assert sum(d[f"{n}/share"] for n in "abc") == pytest.approx(1.0)
    assert d["groups_zero_sd"] == pytest.approx(zero / 6) and zero == 1


def test_dose_correlation_equals_pearson_on_within_group_deviations():
    import numpy as np

    G = 4
    dose = torch.tensor([0.0, 0.5, 1.0, 2.0] * 5, dtype=torch.float64)
    adv = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.8 * dose
    a = adv.numpy().reshape(-1, G)
    d = dose.numpy().reshape(-1, G)
    want = np.corrcoef((a - a.mean(1, keepdims=True)).ravel(), (d - d.mean(1, keepdims=True)).ravel())[0, 1]
    assert dose_correlation(adv, dose, G) == pytest.approx(float(want))
    assert math.isnan(dose_correlation(adv, torch.full((20,), 1.3, dtype=torch.float64), G))  # one dose per group


# ------------------------------------------------------------------ off-policy correction
def test_policy_terms_loss_and_gradient_by_hand():
    """Two tokens of one sequence, A = 2: learner p = 0.5 and 0.1, behaviour mu = 0.25 and 0.2, so r = 2
    and 0.5. cap 1.5, gamma 0.1. d loss / d log p per token, worked by hand:
        none       -A / 2                      (token mean)
        truncated  -A min(r, 1.5) / 2
        shaped     -A gamma r / (r + gamma)^2 / 2, value -A mean_t r / (r + gamma)"""
    A = 2.0
    p, mu = [0.5, 0.1], [0.25, 0.2]
    r = [a / b for a, b in zip(p, mu)]
    want = {"none": ([-A / 2] * 2, -A),
            "truncated": ([-A * min(x, 1.5) / 2 for x in r], -A * (1.5 + 0.5) / 2),
            "shaped": ([-A * 0.1 * x / (x + 0.1) ** 2 / 2 for x in r], -A * sum(x / (x + 0.1) for x in r) / 2)}
    for mode, (grad, value) in want.items():
        lp = torch.tensor([math.log(x) for x in p], dtype=torch.float64, requires_grad=True)
        per_tok, ratio = policy_terms(lp, torch.tensor([math.log(x) for x in mu], dtype=torch.float64),
                                      torch.tensor([A, A], dtype=torch.float64), mode, cap=1.5, gamma=0.1)
        loss = sequence_mean_loss(per_tok, torch.tensor([0, 0]), 1)
        loss.backward()
        assert ratio.tolist() == pytest.approx(r)
        assert float(loss) == pytest.approx(value), mode
        assert lp.grad.tolist() == pytest.approx(grad), mode
    # the truncated weight caps the token whose learner probability ran ahead of the behaviour's
    assert abs(want["truncated"][0][0]) < abs(want["none"][0][0] * r[0])


def test_sequence_mean_loss_equals_trl_grpo_aggregation():
    per_tok = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    seq = torch.tensor([0, 0, 1, 2, 2])
    assert float(sequence_mean_loss(per_tok, seq, 3)) == pytest.approx(((1 + 2) / 2 + 3 + (4 + 5) / 2) / 3)


def _steered_batch(tiny, tmp_path, mode, kappa=4.0):
    """A trainer with is_correction `mode` and one real steered generation batch (behaviour log-probs
    from the HF engine), a dose-dependent reward so the advantages are not 0."""
    from test_objectives import _steered_setup, _trainer

    st, state, rollout, scorer = _steered_setup(tiny, kappa=kappa)
    with torch.no_grad():
        for m in st.layers.values():  # a live LoRA, so the learner differs from the behaviour policy
            m.lora_B["default"].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    reward = lambda prompts, completions, completion_ids, **k: [float(sum(c) % 7) for c in completion_ids]  # noqa
    tr = _trainer(tiny, st, tmp_path, objective="grpo", rollout=rollout, reward=reward, steer_state=state,
                  scorer=scorer)
    tr.objective.is_correction, tr.objective.is_cap = mode, 1.2
    inputs = tr._generate_and_score_completions([tr.train_dataset[i] for i in (0, 0, 1, 1)])
    return st, state, tr, inputs


def test_none_policy_term_equals_trls_loss(tiny, tmp_path):
    """policy_terms(none) aggregated by sequence_mean_loss is TRL's loss_type grpo at ratio 1."""
    from steer_heal.grpo.penalty import trl_batch_rows

    st, state, tr, inputs = _steered_batch(tiny, tmp_path, "none")
    assert float(inputs["advantages"].abs().max()) > 0
    trl = tr._compute_loss(tr.model, inputs)  # grpo, beta 0, none: TRL's loss as is
    s = tr._student_terms(tr.model, inputs, entropy=False)
    _, b, _, t = trl_batch_rows(inputs["prompt_mask"], inputs["completion_mask"])
    per_tok, _ = policy_terms(s["lp"], inputs["sampling_per_token_logps"][b, t], inputs["advantages"][b].double(),
                              "none")
    assert float(trl.detach()) == pytest.approx(float(sequence_mean_loss(per_tok, b, len(inputs["advantages"]))),
                                                abs=1e-6)


@pytest.mark.parametrize("mode", ["truncated", "shaped"])
def test_corrected_policy_loss_equals_float64_recomputation(tiny, tmp_path, mode):
    """The trainer's corrected loss = a per-sequence float64 recomputation with full logits, where the
    behaviour log-probs are recomputed too (steered, live LoRA off) and checked against the engine's."""
    from steer_heal.steering.hooks import steer

    st, state, tr, inputs = _steered_batch(tiny, tmp_path, mode)
    loss = tr._compute_loss(tr.model, inputs)
    pm, ci, cm = inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"]
    total, ratios = 0.0, []
    for i in range(len(ci)):
        prompt = inputs["prompt_ids"][i][pm[i].bool()].tolist()
        comp = ci[i][cm[i].bool()].tolist()
        ids = torch.tensor([prompt + comp])
        with torch.no_grad():
            ls = torch.log_softmax(st.model(input_ids=ids).logits[0].double(), -1)
            with st.live_off(), steer(st.model, state.steering):
                lb = torch.log_softmax(st.model(input_ids=ids).logits[0].double(), -1)
        A, acc = float(inputs["advantages"][i]), 0.0
        for j, tok in enumerate(comp):
            pos = len(prompt) - 1 + j
            mu = float(lb[pos, tok])
            assert float(inputs["sampling_per_token_logps"][i, j]) == pytest.approx(mu, abs=1e-4)  # engine's
            r = math.exp(float(ls[pos, tok]) - mu)
            ratios.append(r)
            acc += -A * (min(r, 1.2) if mode == "truncated" else r / (r + 0.1))
        total += acc / len(comp)
    assert float(loss.detach()) == pytest.approx(total / len(ci), rel=1e-4, abs=1e-6)
    assert max(ratios) > 1.2 or min(ratios) < 0.8  # learner and behaviour differ: the weights matter
    assert tr._metrics["train"]["is_ratio/max"][-1] == pytest.approx(max(ratios), rel=1e-3)


def test_is_correction_refused_where_it_means_nothing(tmp_path):
    from trl import GRPOConfig

    from steer_heal.grpo.objective import OnlineConfigError, check_online_args

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, beta=0.0)
    for obj, mode, fix in (("nll", "truncated", "objective grpo"), ("opd", "shaped", "objective grpo"),
                           ("grpo", "clipped", "use one of none, truncated, shaped")):
        with pytest.raises(OnlineConfigError, match=fix):
            check_online_args(args, obj, is_correction=mode)
    with pytest.raises(OnlineConfigError, match="fix: loss_type: grpo"):
        check_online_args(GRPOConfig(output_dir=str(tmp_path), use_cpu=True, beta=0.0, loss_type="dapo"), "grpo",
                          is_correction="truncated")
    with pytest.raises(OnlineConfigError, match="fix: use one of sum, per_term"):
        check_online_args(args, "grpo", reward_norm="gdpo")


# ------------------------------------------------------------------ per-term gradient norms
def test_grad_norms_per_term_equal_separate_backward_passes(tiny_dir, tmp_path):
    """grpo+nll with an active barrier: the logged |grad| of the policy, NLL and barrier terms equal
    the norms of three independent computations, each with its own backward pass."""
    from test_objectives import _examples, _inputs, _lora_grads, _student, _trainer

    from steer_heal.config import HealConfig
    from steer_heal.heal import heal_terms
    from steer_heal.logprobs import pack
    from steer_heal.models import load_model

    def fresh():  # the same LoRA A (drawn from the global RNG) in every copy
        torch.manual_seed(0)
        tiny = load_model(str(tiny_dir["llama"]), dtype="float32", device="cpu")
        return tiny, _student(tiny)

    def norm(st):
        return math.sqrt(sum(float((g.double() ** 2).sum()) for g in _lora_grads(st).values()))

    beta, tau, keep = 0.9, 0.01, [1, 0, 1, 1]
    tiny, st = fresh()
    tok = tiny.tokenizer
    prompts, comps = _examples(tok)
    tr = _trainer(tiny, st, tmp_path / "all", objective="grpo+nll", beta=beta, tau=tau)
    tr.diag_every = 1
    tr._compute_loss(tr.model, _inputs(tok, prompts, comps, keep))
    got = {k: tr._metrics["train"][f"grad/{k}"][-1] for k in ("policy", "nll", "barrier")}
    want = {}
    tiny, st = fresh()  # policy: TRL's own loss (grpo, no barrier), times w_pg = 0.7
    tr = _trainer(tiny, st, tmp_path / "pg", objective="grpo")
    tr._compute_loss(tr.model, _inputs(tok, prompts, comps, keep)).backward()
    want["policy"] = 0.7 * norm(st)
    tiny, st = fresh()  # nll: the iterative heal's NLL on the kept rows, times w_nll = 1.3
    kept = [i for i, k in enumerate(keep) if k]
    nll, *_ = heal_terms(st, pack([prompts[i] for i in kept], [comps[i] for i in kept], tok.pad_token_id),
                         HealConfig(kl_beta=beta, kl_tau=tau), st.live_off)
    nll.backward()
    want["nll"] = 1.3 * norm(st)
    tiny, st = fresh()  # barrier: the plain two-forward reference penalty over every rollout
    pi, pm, ci, cm = trl_batch(tok, prompts, comps)
    pen, _, _ = rmse_kl_penalty(st.model, st.live_off, pi, pm, ci, cm, beta, tau)
    pen.backward()
    want["barrier"] = norm(st)
    assert min(want.values()) > 1e-5
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4), k


# ------------------------------------------------------------------ does the student carry the vector?
def test_activation_shift_equals_hidden_states_recomputation(tiny):
    from steer_heal.chat import render_prompt
    from steer_heal.steering import SteeringVector, activation_shift

    tok = tiny.tokenizer
    st = Student(tiny.model, tok, r=4, alpha=8, band=(0.0, 1.0))
    users = ["hi", "tell me about rivers", "why is the sky blue"]
    prompts = [render_prompt(tok, u) for u in users]
    v = SteeringVector([0], torch.randn(1, tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(5)))
    assert activation_shift(st.model, tok, prompts, v, st.live_off, st.base) == dict(shift_cos=0.0, shift_dose=0.0)
    with torch.no_grad():
        for m in st.layers.values():
            m.lora_B["default"].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(6))
    st.bake()  # the baked student differs from base
    got = activation_shift(st.model, tok, prompts, v, st.live_off, st.base, batch_size=2)
    shift = torch.zeros(tiny.model.config.hidden_size, dtype=torch.float64)
    for p in prompts:  # one unpadded prompt at a time; hidden_states[1] is decoder layer 0's output
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            with st.live_off():
                hs = st.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1].double()
            with st.base():
                hb = st.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1].double()
        shift += (hs - hb) / len(prompts)
    vv = v.vectors[0].double()
    assert got["shift_cos"] == pytest.approx(float(shift @ vv / (shift.norm() * vv.norm())), abs=1e-5)
    assert got["shift_dose"] == pytest.approx(float(shift @ vv / (vv @ vv)), rel=1e-4, abs=1e-6)
    assert abs(got["shift_dose"]) > 1e-4


# ------------------------------------------------------------------ the whole online run logs it
def test_online_run_logs_the_reward_signal(tiny_dir, mfv_dir, tmp_path):
    """GRPO with groups spanning doses 0 and 2 x kappa, per_term rewards, truncated correction: the bake
    rows, the tracker's log and events.jsonl carry the diagnostics, and each equals a recomputation
    from the per-rollout records."""
    from trl import GRPOConfig, TrlParser

    from steer_heal.grpo.online import OnlineConfig, OnlineRun

    out = tmp_path / "run"
    cfg, args = TrlParser((OnlineConfig, GRPOConfig)).parse_args_and_config(
        args=["--config", "recipes/configs/grpo_smoke.yaml", "--model", str(tiny_dir["llama"]), "--output_dir",
              str(out), "--max_steps", "2", "--bake_every", "2", "--mfv", "false", "--disable_tqdm", "true",
              "--objective", "grpo", "--rollout_alphas", "0", "2", "--reward_norm", "per_term", "--is_correction",
              "truncated", "--kl_beta", "0.5"])
    run = OnlineRun(cfg, args, seed=args.seed)
    run.setup()
    tr = run.trainer()
    tr.train()
    kappas = [h["kappa"] for h in tr.state.log_history if "kappa" in h]  # the dose controller's, per step
    ev = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    ro = [e for e in ev if e["event"] == "rollouts"]
    sig = [e for e in ev if e["event"] == "reward_signal"]
    assert [e["step"] for e in ro] == [0, 1] and [e["step"] for e in sig] == [0, 1]
    for r, s, kappa in zip(ro, sig, kappas):
        assert r["dose"] == pytest.approx([0.0, 2 * kappa] * (len(r["dose"]) // 2), rel=1e-5)
        A = torch.tensor(r["advantage"], dtype=torch.float64)
        names = list(r["rewards"])
        rew = torch.tensor([r["rewards"][n] for n in names], dtype=torch.float64).T
        # per_term advantages, recomputed from the logged rewards by the naive loop
        w = [abs(f.weight) for f in tr.reward_funcs]
        assert A.tolist() == pytest.approx(_naive_adv(rew.tolist(), 2, w, "per_term"), abs=2e-4)
        # groups of 2 at doses (0, 2k): within-group deviations are +-delta/2 and +-k, so the correlation is
        # sum(delta) / sqrt(n_groups * sum(delta^2)), delta = A(steered) - A(unsteered)
        delta = [float(A[i + 1] - A[i]) for i in range(0, len(A), 2)]
        ss = sum(x * x for x in delta)
        want = sum(delta) / math.sqrt(len(delta) * ss) if ss > 0 else None
        assert (s["adv_dose_corr"] is None) == (want is None)
        if want is not None:
            assert s["adv_dose_corr"] == pytest.approx(want, abs=1e-4)
        shares = [s[f"{n}/share"] for n in names if s[f"{n}/share"] is not None]
        if shares:
            assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    rows = [json.loads(x) for x in (out / "bakes.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    # what it trained on: 2 optimizer steps at the linear schedule's 1e-3 and 5e-4 (max_steps 2), and every
    # completion token the policy term read (objective grpo: all rollouts)
    assert row["opt_steps"] == 2 and row["lr_sum"] == pytest.approx(1.5e-3, rel=1e-9)
    assert row["trained_tokens"] == tr.trained_tokens > 0
    # the bake's realised doses: every dose its steps generated at (0 and 2 x each step's kappa), as logged
    want = sorted({0.0} | {2 * k for k in kappas})
    assert row["doses"] == pytest.approx(want, rel=1e-5)
    from steer_heal.study.arms import realised

    assert realised(out)["doses_logged"] and realised(out)["doses"] == [
        pytest.approx(want, abs=1e-4)]
    logged = {k for h in tr.state.log_history for k in h}
    assert {"grad/policy", "grad/barrier", "is_ratio/mean", "groups_zero_sd"} <= logged
    assert row["grad_policy"] > 0 and row["grad_barrier"] >= 0 and -1 <= row["shift_cos"] <= 1
    first = next(h for h in tr.state.log_history if "grad/policy" in h)
    assert first["step"] == 1  # the bake's first step (global step 0 -> logged as step 1)
    assert row["grad_policy"] == pytest.approx(first["grad/policy"])
    assert "shift_cos" in (out / "bake_table.md").read_text()
