"""Online objectives (grpo | nll | grpo+nll | kd): losses against independent computations, the fused
forward against TRL's two-forward path, the direction each objective moves the student, guards."""
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _helpers import trl_batch  # noqa: E402

from reward import RewardConfig, Scorer  # noqa: E402
from reward.trl_rewards import user_text  # noqa: E402
from steer_heal.chat import encode_prompt, render_prompt  # noqa: E402
from steer_heal.config import HealConfig  # noqa: E402
from steer_heal.heal import heal_terms  # noqa: E402
from steer_heal.logprobs import pack  # noqa: E402
from steer_heal.steering import extract_vector  # noqa: E402
from steer_heal.steering.hooks import steer  # noqa: E402
from steer_heal.student import Student  # noqa: E402

PERSONAS = ("You are kind.", "You are cruel.")
LOOSE = RewardConfig(min_tokens=1, max_tail_nll=1e9, max_repetition=1.0, max_verbalisation=1.0, max_refusal=1.0)


def _student(tiny, scale=0.3):
    st = Student(tiny.model, tiny.tokenizer, r=4, alpha=8, band=(0.0, 1.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in st.layers.values():
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)
    return st


def _trainer(tiny, st, tmp_path, objective="grpo", beta=0.0, tau=0.0, fused=True, rollout=None, reward=None,
             steer_state=None, scorer=None, estimator="token", **grpo_kw):
    from datasets import Dataset
    from trl import GRPOConfig

    from steer_heal.config import RunConfig
    from steer_heal.grpo.objective import KLPenalty, Objective
    from steer_heal.grpo.trainer import SteerHealGRPOTrainer

    kw = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.0, num_generations=2,
              per_device_train_batch_size=4, max_completion_length=8, report_to=[], logging_steps=1,
              save_strategy="no", loss_type="grpo")
    kw.update(grpo_kw)
    args = GRPOConfig(**kw)
    users = ["hi", "tell me about rivers", "why is the sky blue", "what should I do today", "say something",
             "how do birds fly"]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": u}]} for u in users])
    reward = reward or (lambda prompts, completions, **k: [float(len(c)) for c in completions])
    tr = SteerHealGRPOTrainer(model=st.model, reward_funcs=[reward], args=args, train_dataset=ds,
                              processing_class=tiny.tokenizer, student=st,
                              kl=KLPenalty.from_config(RunConfig().heal, beta=beta, tau=tau),
                              objective=Objective.from_config(RunConfig().online, name=objective, w_pg=0.7, w_nll=1.3,
                                                              fused=fused, opd_estimator=estimator),
                              rollout_func=rollout, steer_state=steer_state, scorer=scorer)
    tr.current_gradient_accumulation_steps = 1
    return tr


def _examples(tok):
    prompts = [encode_prompt(tok, render_prompt(tok, u)) for u in
               ["hi", "tell me a long story about rivers", "what is two plus two", "why"]]
    comps = [tok(t, add_special_tokens=False).input_ids for t in
             [" well then we go", " yes yes yes yes yes yes no", " it is four, my friend", " because it is"]]
    return prompts, comps


def _inputs(tok, prompts, comps, keep, adv=(1.0, -1.0, 0.5, -0.5)):
    pi, pm, ci, cm = trl_batch(tok, prompts, comps)
    return dict(prompt_ids=pi, prompt_mask=pm, completion_ids=ci, completion_mask=cm,
                advantages=torch.tensor(adv), num_items_in_batch=cm.sum(), keep=torch.tensor(keep, dtype=torch.float32))


def _lora_grads(st):
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in st.model.named_parameters() if "lora_" in n and p.requires_grad}


def test_nll_objective_equals_iterative_heal_terms(tiny, tmp_path):
    """The online heal on a TRL-shaped batch = the iterative heal's NLL + lam * barrier on the kept rows."""
    tok = tiny.tokenizer
    st = _student(tiny)
    beta, tau = 0.7, 0.02
    tr = _trainer(tiny, st, tmp_path, objective="nll", beta=beta, tau=tau)
    prompts, comps = _examples(tok)
    keep = [1, 0, 1, 1]
    loss = tr._compute_loss(tr.model, _inputs(tok, prompts, comps, keep))
    kept = [i for i, k in enumerate(keep) if k]
    batch = pack([prompts[i] for i in kept], [comps[i] for i in kept], tok.pad_token_id)
    cfg = HealConfig(kl_beta=beta, kl_tau=tau, kl_agg="rmse", kl_reference="prev")
    nll, D, bar, _, _ = heal_terms(st, batch, cfg, st.live_off)
    heal_loss = nll + cfg.kl_beta * bar.mean()
    assert float(bar.mean()) > 0  # the barrier is active, so both terms are compared
    assert float(loss.detach()) == pytest.approx(float(heal_loss.detach()), rel=1e-5)
    assert tr._metrics["train"]["nll_kept"][-1] == pytest.approx(float(nll), rel=1e-5)


def test_kd_objective_equals_float64_full_logits(tiny, tmp_path):
    from steer_heal.grpo.rollout import SteerState

    tok = tiny.tokenizer
    st = _student(tiny)
    v = extract_vector(st.model, tok, *PERSONAS, ["hi", "tell me a story", "why?"], [0, 1])
    state = SteerState(v, 3.0)
    tr = _trainer(tiny, st, tmp_path, objective="kd", steer_state=state)
    prompts, comps = _examples(tok)
    keep = [1, 1, 0, 1]
    loss = tr._compute_loss(tr.model, _inputs(tok, prompts, comps, keep))
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in (0, 1, 3):  # one unpadded sequence at a time, full logits, float64
            ids = torch.tensor([prompts[i] + comps[i]])
            ls = torch.log_softmax(st.model(input_ids=ids).logits[0].double(), -1)
            with st.live_off(), steer(st.model, state.steering):
                lt = torch.log_softmax(st.model(input_ids=ids).logits[0].double(), -1)
            for t in range(len(prompts[i]) - 1, len(prompts[i]) + len(comps[i]) - 1):
                tot += float((lt[t].exp() * (lt[t] - ls[t])).sum())
                n += 1
    assert tot / n > 1e-3
    assert float(loss.detach()) == pytest.approx(tot / n, rel=1e-4)


@pytest.mark.parametrize("objective", ["grpo", "grpo+nll"])
def test_fused_forward_equals_two_forward_path(tiny_dir, tmp_path, objective):
    from steer_heal.models import load_model

    out = {}
    for fused in (True, False):
        tiny = load_model(str(tiny_dir["llama"]), dtype="float32", device="cpu")
        tok = tiny.tokenizer
        prompts, comps = _examples(tok)
        st = _student(tiny)
        tr = _trainer(tiny, st, tmp_path / str(fused), objective=objective, beta=0.9, tau=0.01, fused=fused)
        loss = tr._compute_loss(tr.model, _inputs(tok, prompts, comps, [1, 0, 1, 1]))
        loss.backward()
        out[fused] = (float(loss.detach()), _lora_grads(st), tr._metrics["train"]["kl_rmse"][-1])
        st.model.zero_grad(set_to_none=True)
    (l1, g1, k1), (l2, g2, k2) = out[True], out[False]
    assert l1 == pytest.approx(l2, abs=1e-6) and k1 == pytest.approx(k2, abs=1e-6)
    assert max(float(g.abs().max()) for g in g1.values()) > 1e-4
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-5), n


def _steered_setup(tiny, kappa=4.0):
    from steer_heal.engine import HFEngine
    from steer_heal.grpo.rollout import SteerState, make_rollout_func

    tok = tiny.tokenizer
    st = Student(tiny.model, tok, r=4, alpha=8, band=(0.0, 1.0))
    st.reset_live(seed=1)
    v = extract_vector(st.model, tok, *PERSONAS, ["hi", "tell me a story", "why?", "what now"], [0, 1])
    state = SteerState(v, kappa)
    rollout = make_rollout_func(HFEngine(st.model, tok), st, state, max_new_tokens=8)
    scorer = Scorer(st.model, tok, PERSONAS, LOOSE, ref_ctx=st.base)
    return st, state, rollout, scorer


def test_constant_group_reward_zero_grpo_gradient_but_not_nll(tiny_dir, tmp_path):
    """A reward constant inside each group gives zero advantages: GRPO learns nothing from the steered
    rollouts; the filtered NLL still pulls the student toward them."""
    from steer_heal.models import load_model

    const = lambda prompts, completions, **k: [float(len(user_text(p))) for p in prompts]  # noqa: E731
    grads = {}
    for obj in ("grpo", "nll"):
        tiny = load_model(str(tiny_dir["llama"]), dtype="float32", device="cpu")
        st, state, rollout, scorer = _steered_setup(tiny)
        tr = _trainer(tiny, st, tmp_path / obj, objective=obj, rollout=rollout, reward=const, steer_state=state,
                      scorer=scorer)
        batch = [tr.train_dataset[i] for i in (0, 0, 1, 1)]
        inputs = tr._generate_and_score_completions(batch)
        assert float(inputs["advantages"].abs().max()) == 0.0
        assert float(inputs["keep"].sum()) == 4
        tr._compute_loss(tr.model, inputs).backward()
        grads[obj] = max(float(g.abs().max()) for g in _lora_grads(st).values())
    assert grads["grpo"] == 0.0
    assert grads["nll"] > 1e-4


def _kl_to_teacher(st, state, tok, users) -> float:
    """Mean token KL(teacher || student) on the teacher's greedy answers to held-out prompts."""
    from steer_heal.engine import HFEngine, Sampling
    from steer_heal.heal.kl import kl_from_logits

    prompts = [render_prompt(tok, u) for u in users]
    with st.live_off():
        ro = HFEngine(st.model, tok).generate(prompts, state.steering, Sampling(max_new_tokens=8, temperature=0.0),
                                               logprobs=False)
    tot, n = 0.0, 0
    with torch.no_grad():
        for r in ro:
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            s = st.model(input_ids=ids).logits[0]
            with st.live_off(), steer(st.model, state.steering):
                t = st.model(input_ids=ids).logits[0]
            P = len(r.prompt_ids)
            kl = kl_from_logits(t[P - 1:-1], s[P - 1:-1])
            tot, n = tot + float(kl.sum()), n + len(kl)
    return tot / n


def test_nll_moves_student_toward_steered_teacher_more_than_grpo(tiny_dir, tmp_path):
    """12 steps on the tiny model: the online heal lowers KL(teacher || student) on held-out prompts,
    by more than GRPO does (direction, not timing)."""
    from reward.trl_rewards import make_reward_functions
    from steer_heal.models import load_model

    held_out = ["describe the ocean", "what makes a good friend", "tell me about the moon"]
    drop = {}
    for obj in ("nll", "grpo"):
        tiny = load_model(str(tiny_dir["llama"]), dtype="float32", device="cpu")
        st, state, rollout, scorer = _steered_setup(tiny)
        before = _kl_to_teacher(st, state, tiny.tokenizer, held_out)
        tr = _trainer(tiny, st, tmp_path / obj.replace("+", "_"), objective=obj, rollout=rollout,
                      reward=make_reward_functions(scorer, ["trait_llr"])[0], steer_state=state, scorer=scorer,
                      max_steps=12, learning_rate=5e-3, lr_scheduler_type="constant", seed=3)
        tr.train()
        drop[obj] = before - _kl_to_teacher(st, state, tiny.tokenizer, held_out)
    assert drop["nll"] > 0
    assert drop["nll"] > drop["grpo"]


def test_guards_name_the_fix(tmp_path):
    from trl import GRPOConfig

    from steer_heal.grpo.objective import OnlineConfigError, check_online_args

    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.0, num_generations=2,
                per_device_train_batch_size=2, report_to=[])
    check_online_args(GRPOConfig(**base), "nll")  # the defaults pass
    cases = [(dict(num_iterations=2), "nll", "num_iterations: 1"),
             (dict(steps_per_generation=2), "nll", "leave steps_per_generation unset"),
             (dict(off_policy_mask_threshold=0.5), "grpo", "remove off_policy_mask_threshold"),
             ({}, "ppo", "use one of grpo, nll, grpo+nll, kd")]
    for kw, obj, fix in cases:
        with pytest.raises(OnlineConfigError) as e:
            check_online_args(GRPOConfig(**base, **kw), obj)
        msg = str(e.value)
        assert "\n" not in msg and "fix:" in msg and fix in msg, msg


def test_judge_reward_refused_in_one_line(tmp_path):
    from trl import GRPOConfig

    from steer_heal.grpo.objective import OnlineConfigError
    from steer_heal.grpo.online import OnlineConfig, check_online_config

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.0, num_generations=2,
                      per_device_train_batch_size=2, report_to=[])
    with pytest.raises(OnlineConfigError, match="fix: reward_trait: llr or projection"):
        check_online_config(OnlineConfig(reward_trait="judge"), args)
    with pytest.raises(OnlineConfigError, match="'reward_ablation': 'trait' is not allowed; fix: use one of"):
        check_online_config(OnlineConfig(reward_ablation="trait"), args)


# ------------------------------------------------------------------ on-policy distillation (opd)
def _full_logps(st, ids, steering=None, live=True):
    """float64 log-softmax over the whole vocabulary for one unpadded sequence: the student (live
    LoRA on) or the teacher (live off, steered)."""
    from contextlib import nullcontext

    with torch.no_grad(), (nullcontext() if live else st.live_off()), steer(st.model, steering):
        return torch.log_softmax(st.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def _opd_setup(tiny, tmp_path, kappa=3.0, scale=0.3, estimator="token"):
    from steer_heal.grpo.rollout import SteerState

    tok = tiny.tokenizer
    st = _student(tiny, scale=scale)
    v = extract_vector(st.model, tok, *PERSONAS, ["hi", "tell me a story", "why?"], [0, 1])
    state = SteerState(v, kappa)
    tr = _trainer(tiny, st, tmp_path, objective="opd", steer_state=state, estimator=estimator)
    return tok, st, state, tr


def test_opd_token_advantages_equal_a_hand_computation(tiny, tmp_path):
    """A_t = log p_T(y_t) - log p_S(y_t) at every completion token (0 at padding), and TRL's policy
    loss at ratio 1 is the per-sequence mean of -A_t, averaged over sequences."""
    tok, st, state, tr = _opd_setup(tiny, tmp_path)
    prompts, comps = _examples(tok)
    inputs = _inputs(tok, prompts, comps, keep=[1, 0, 1, 1])  # opd ignores the filter
    s = tr._student_terms(tr.model, inputs, entropy=True)
    adv = tr.opd_advantages(s)
    per_seq = []
    for i in range(len(prompts)):
        ids = prompts[i] + comps[i]
        ls, lt = _full_logps(st, ids), _full_logps(st, ids, state.steering, live=False)
        a = [float(lt[t, ids[t + 1]] - ls[t, ids[t + 1]]) for t in range(len(prompts[i]) - 1, len(ids) - 1)]
        assert adv[i, :len(a)].tolist() == pytest.approx(a, abs=1e-4)
        assert adv[i, len(a):].abs().sum() == 0
        per_seq.append(-sum(a) / len(a))
    assert max(abs(x) for x in per_seq) > 1e-2  # teacher and student differ on this batch
    loss = tr._compute_loss(tr.model, inputs)
    assert float(loss.detach()) == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-4, abs=1e-6)


def test_opd_gradient_is_exactly_zero_when_teacher_is_student(tiny, tmp_path):
    """Fresh live LoRA (B = 0) and dose 0: the teacher is the student, every advantage is 0 and so is
    every gradient; the same batch with a dose has a gradient."""
    grads = {}
    tok, st, state, tr = _opd_setup(tiny, tmp_path, kappa=0.0, scale=0.0)
    prompts, comps = _examples(tok)
    inputs = _inputs(tok, prompts, comps, keep=[1, 1, 1, 1])
    for kappa in (0.0, 3.0):
        state.kappa = kappa
        st.model.zero_grad(set_to_none=True)
        tr._compute_loss(tr.model, inputs).backward()
        grads[kappa] = _lora_grads(st)
        if kappa == 0.0:
            adv = tr.opd_advantages(tr._student_terms(tr.model, inputs, entropy=True))
            assert torch.equal(adv, torch.zeros_like(adv))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[0.0].values())
    assert sum(float(g.abs().sum()) for g in grads[3.0].values()) > 0


def test_opd_full_vocabulary_estimator_equals_float64_reverse_kl(tiny, tmp_path):
    tok, st, state, tr = _opd_setup(tiny, tmp_path, estimator="full")
    prompts, comps = _examples(tok)
    loss = tr._compute_loss(tr.model, _inputs(tok, prompts, comps, keep=[1, 0, 1, 1]))
    tot, n = 0.0, 0
    for i in range(len(prompts)):  # every rollout, one unpadded sequence at a time
        ids = prompts[i] + comps[i]
        ls, lt = _full_logps(st, ids), _full_logps(st, ids, state.steering, live=False)
        for t in range(len(prompts[i]) - 1, len(ids) - 1):
            tot += float((ls[t].exp() * (ls[t] - lt[t])).sum())  # KL(student || teacher)
            n += 1
    assert tot / n > 1e-3
    assert float(loss.detach()) == pytest.approx(tot / n, rel=1e-4)
    assert tr._metrics["train"]["opd_kl"][-1] == pytest.approx(tot / n, rel=1e-4)


def test_opd_with_prompt_distil_or_bad_estimator_is_refused():
    from trl import GRPOConfig

    from steer_heal.config import RunConfig
    from steer_heal.grpo.objective import OnlineConfigError
    from steer_heal.grpo.online import check_online_config

    args = GRPOConfig(output_dir="/tmp/x", use_cpu=True, beta=0.0)
    cfg = RunConfig(control="prompt_distil")
    cfg.online.objective = "opd"
    with pytest.raises(OnlineConfigError, match="fix: objective nll"):
        check_online_config(cfg, args)
    cfg = RunConfig()
    cfg.online.objective, cfg.online.opd_estimator = "opd", "exact"
    with pytest.raises(OnlineConfigError, match="fix: use one of token, full"):
        check_online_config(cfg, args)


def test_live_merged_weights_serve_the_learner(tiny, tiny_dir):
    """What an engine loads for on-policy rollouts (baked + live LoRA), written into a fresh plain
    copy of the model by checkpoint name, gives the student's own logits."""
    from steer_heal.models import load_model

    st = _student(tiny)
    st.bake()
    with torch.no_grad():  # a live LoRA that differs from the baked one
        for m in st.layers.values():
            m.lora_B["default"].weight.normal_(0, 0.2)
    pushed = dict(st.merged_weights(live=True))
    plain = load_model(str(tiny_dir["llama"]), dtype="float32", device="cpu").model
    params = dict(plain.named_parameters())
    assert pushed and set(pushed) <= set(params)
    ids = torch.tensor([encode_prompt(tiny.tokenizer, render_prompt(tiny.tokenizer, "tell me a story"))])
    with torch.no_grad():
        for n, w in pushed.items():
            params[n].copy_(w)
        want = st.model(input_ids=ids).logits
        with st.live_off():
            baked = st.model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    assert (want - baked).abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-4)


def _heldout_reverse_kl(st, tok, users, steering) -> float:
    """Token-mean exact KL(student || steered baked teacher) on the student's own greedy answers."""
    from steer_heal.engine import HFEngine, Sampling

    eng = HFEngine(st.model, tok)
    ro = eng.generate([render_prompt(tok, u) for u in users], None, Sampling(max_new_tokens=8, temperature=0.0))
    tot, n = 0.0, 0
    for r in ro:
        ids = r.prompt_ids + r.completion_ids
        ls, lt = _full_logps(st, ids), _full_logps(st, ids, steering, live=False)
        for t in range(len(r.prompt_ids) - 1, len(ids) - 1):
            tot += float((ls[t].exp() * (ls[t] - lt[t])).sum())
            n += 1
    return tot / max(n, 1)


@pytest.mark.slow
def test_opd_lowers_reverse_kl_to_the_teacher_more_per_token_than_nll(tiny_dir, mfv_dir, tmp_path):
    """12 steps of each on the tiny model, the same fixed teacher (no bake, dose held), the filter open
    so nll trains on every steered rollout: KL(student || teacher) on held-out prompts falls, and
    falls more per generated token with opd."""
    from trl import GRPOConfig, TrlParser

    from steer_heal.grpo.online import OnlineConfig, OnlineRun
    from steer_heal.presets import load_preset

    users = load_preset("care-over-authority").eval_prompts[:8]
    out = {}
    for obj in ("opd", "nll"):
        cfg, args = TrlParser((OnlineConfig, GRPOConfig)).parse_args_and_config(
            args=["--config", "recipes/configs/grpo_smoke.yaml", "--model", str(tiny_dir["llama"]),
                  "--output_dir", str(tmp_path / obj), "--max_steps", "12", "--bake_every", "100", "--mfv", "false",
                  "--disable_tqdm", "true", "--objective", obj, "--dose_band", "0.0", "1.0",
                  "--max_tail_nll", "1e9", "--max_repetition", "1.0", "--max_verbalisation", "1.0",
                  "--max_refusal", "1.0", "--min_tokens", "1"])
        run = OnlineRun(cfg, args, seed=args.seed)
        run.setup()
        teacher = run.state.steering
        before = _heldout_reverse_kl(run.student, run.tok, users, teacher)
        tr = run.trainer()
        tr.train()
        after = _heldout_reverse_kl(run.student, run.tok, users, teacher)
        out[obj] = (before, after, run.state.gen_tokens)
    (b_o, a_o, g_o), (b_n, a_n, g_n) = out["opd"], out["nll"]
    assert b_o == pytest.approx(b_n)  # the same start: base student, same teacher
    assert a_o < b_o
    assert (b_o - a_o) / g_o > (b_n - a_n) / g_n, out
