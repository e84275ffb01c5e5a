"""Online GRPO core: the RMSE penalty, TRL's loss at beta=0, steered rollouts."""
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _helpers import (  # noqa: E402
    multi_strength_check,
    rmse_kl_penalty,
    trl_batch,
)

from steer_heal.chat import encode_prompt, render_prompt  # noqa: E402
from steer_heal.student import Student  # noqa: E402


def _student(tiny, seed=0):
    st = Student(tiny.model, tiny.tokenizer, r=4, alpha=8, band=(0.0, 1.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in st.layers.values():
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    return st


def test_penalty_equals_float64_hand_computation(tiny):
    tok = tiny.tokenizer
    st = _student(tiny)
    prompts = [encode_prompt(tok, render_prompt(tok, u)) for u in ["hi", "tell me a long story about rivers"]]
    comps = [tok(" well then we go", add_special_tokens=False).input_ids,
             tok(" yes yes yes yes yes yes no", add_special_tokens=False).input_ids]
    pi, pm, ci, cm = trl_batch(tok, prompts, comps)
    beta, tau = 0.7, 0.05
    pen, D, kl = rmse_kl_penalty(st.model, st.live_off, pi, pm, ci, cm, beta, tau)
    ref_pen = 0.0
    for p, c, d in zip(prompts, comps, D):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            ls = torch.log_softmax(st.model(input_ids=ids).logits[0].double(), -1)
            with st.live_off():
                lr = torch.log_softmax(st.model(input_ids=ids).logits[0].double(), -1)
        kls = [float((ls[t].exp() * (ls[t] - lr[t])).sum()) for t in range(len(p) - 1, len(p) + len(c) - 1)]
        Dh = (sum(x * x for x in kls) / len(kls) + 1e-8) ** 0.5
        assert float(d.detach()) == pytest.approx(Dh, rel=1e-4, abs=1e-6)
        ref_pen += max(0.0, Dh - tau)
    assert float(pen.detach()) == pytest.approx(beta * ref_pen / 2, rel=1e-4, abs=1e-7)
    assert float(pen.detach()) > 0


def test_penalty_zero_right_after_bake(tiny):
    """Right after a bake the live LoRA is fresh (B=0): the student equals the `prev` reference."""
    tok = tiny.tokenizer
    st = _student(tiny)
    st.bake()
    prompts = [encode_prompt(tok, render_prompt(tok, "hi"))]
    pi, pm, ci, cm = trl_batch(tok, prompts, [tok(" hello there", add_special_tokens=False).input_ids])
    pen, D, kl = rmse_kl_penalty(st.model, lambda: st.reference("prev"), pi, pm, ci, cm, 1.0, 0.0)
    assert float(kl.detach().abs().max()) < 1e-6 and float(D[0].detach()) == pytest.approx(1e-4, abs=1e-6)
    # and the base stays recoverable: base-mode KL is not zero after a non-trivial bake
    pen_b, D_b, _ = rmse_kl_penalty(st.model, lambda: st.reference("base"), pi, pm, ci, cm, 1.0, 0.0)
    assert float(D_b[0].detach()) > 1e-3


def _trainer(tiny, beta_kl, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    from steer_heal.config import RunConfig
    from steer_heal.grpo.objective import KLPenalty, Objective
    from steer_heal.grpo.trainer import SteerHealGRPOTrainer

    st = _student(tiny)
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.0, num_generations=2,
                      per_device_train_batch_size=2, max_completion_length=8, report_to=[], logging_steps=1)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * 4)
    tr = SteerHealGRPOTrainer(model=st.model, reward_funcs=[lambda prompts, completions, **k: [0.0] * len(prompts)],
                              args=args, train_dataset=ds, processing_class=tiny.tokenizer, student=st,
                              kl=KLPenalty.from_config(RunConfig().heal, beta=beta_kl, tau=0.0),
                              objective=Objective.from_config(RunConfig().online, name="grpo"))
    return tr, st


def test_beta_zero_equals_trl_loss(tiny, tmp_path):
    from trl import GRPOTrainer

    tr, st = _trainer(tiny, 0.0, tmp_path)
    tok = tiny.tokenizer
    prompts = [encode_prompt(tok, render_prompt(tok, u)) for u in ["hi", "what is two plus two"]]
    comps = [
        tok(" four", add_special_tokens=False).input_ids,
        tok(" it is four, friend", add_special_tokens=False).input_ids,
    ]
    pi, pm, ci, cm = trl_batch(tok, prompts, comps)
    inputs = dict(prompt_ids=pi, prompt_mask=pm, completion_ids=ci, completion_mask=cm,
                  advantages=torch.tensor([1.0, -1.0]), num_items_in_batch=cm.sum())
    tr.current_gradient_accumulation_steps = 2  # set by the training loop; fixed here
    ours = tr._compute_loss(tr.model, inputs)
    theirs = GRPOTrainer._compute_loss(tr, tr.model, inputs)
    assert torch.equal(ours, theirs)
    tr.kl.beta = 2.0  # with the penalty on, the loss grows by beta * mean relu(D - tau) / grad-accum
    pen, _, _ = rmse_kl_penalty(tr.model, st.live_off, pi, pm, ci, cm, 2.0, 0.0)
    with_pen = tr._compute_loss(tr.model, inputs)
    assert float((with_pen - theirs).detach()) == pytest.approx(
        float(pen.detach()) / tr.current_gradient_accumulation_steps, rel=1e-4
    )
    assert "kl_rmse" in tr._metrics["train"] and "barrier_active_frac" in tr._metrics["train"]


def test_steered_rollouts_match_engine_and_differ_from_unsteered(tiny):
    from types import SimpleNamespace

    from steer_heal.engine import HFEngine, Sampling
    from steer_heal.grpo.rollout import SteerState, make_rollout_func
    from steer_heal.steering import extract_vector

    st = _student(tiny)
    st.bake()
    tok = tiny.tokenizer
    v = extract_vector(st.model, tok, "You are kind.", "You are cruel.", ["hi", "tell me a story", "why?"], [0, 1])
    state = SteerState(v, 6.0)
    eng = HFEngine(st.model, tok)
    fn = make_rollout_func(eng, st, state, max_new_tokens=8, temperature=0.0)
    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=0), accelerator=SimpleNamespace(process_index=0, device="cpu")
    )
    prompts = [[{"role": "user", "content": u}] for u in ["hi", "hi", "tell me a story", "tell me a story"]]
    out = fn(prompts, trainer)
    assert out["user"] == ["hi", "hi", "tell me a story", "tell me a story"]
    rendered = [render_prompt(tok, u) for u in out["user"]]
    with st.live_off():
        direct = eng.generate(rendered, state.steering, Sampling(max_new_tokens=8, temperature=0.0))
        plain = eng.generate(rendered, None, Sampling(max_new_tokens=8, temperature=0.0))
    assert out["completion_ids"] == [r.completion_ids for r in direct]
    assert out["completion_ids"] != [r.completion_ids for r in plain]
    assert all(len(lp) == len(c) for lp, c in zip(out["logprobs"], out["completion_ids"]))


def test_two_grpo_steps_on_tiny_model(tiny, tmp_path):
    """TRL drives our rollout_func and reward functions; the live LoRA moves; metrics are logged."""
    from datasets import Dataset
    from trl import GRPOConfig

    from reward import RewardConfig, Scorer, make_reward_functions
    from steer_heal.config import RunConfig
    from steer_heal.engine import HFEngine
    from steer_heal.grpo.objective import KLPenalty, Objective
    from steer_heal.grpo.rollout import SteerState, make_rollout_func
    from steer_heal.grpo.trainer import SteerHealGRPOTrainer
    from steer_heal.steering import extract_vector

    tok = tiny.tokenizer
    st = Student(tiny.model, tok, r=4, alpha=8, band=(0.0, 1.0))
    personas = ("You are kind.", "You are cruel.")
    v = extract_vector(st.model, tok, *personas, ["hi", "tell me a story", "why?"], [0, 1])
    state = SteerState(v, 2.0)
    eng = HFEngine(st.model, tok)
    scorer = Scorer(st.model, tok, personas, RewardConfig(min_tokens=1), ref_ctx=st.base)
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.0, num_generations=2,
                      per_device_train_batch_size=4, max_completion_length=8, max_steps=2, report_to=[],
                      logging_steps=1, learning_rate=1e-2, loss_type="grpo", save_strategy="no")
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": u}]} for u in ["hi", "why?", "tell me", "ok"]])
    tr = SteerHealGRPOTrainer(model=st.model, reward_funcs=make_reward_functions(scorer), args=args, train_dataset=ds,
                              processing_class=tok, student=st, kl=KLPenalty.from_config(RunConfig().heal, beta=0.5,
                                                                                         tau=0.0),
                              objective=Objective.from_config(RunConfig().online, name="grpo"),
                              rollout_func=make_rollout_func(eng, st, state, max_new_tokens=8))
    before = {n: p.detach().clone() for n, p in st.model.named_parameters() if "lora_B" in n}
    tr.train()
    moved = max(float((p - before[n]).abs().max()) for n, p in st.model.named_parameters() if "lora_B" in n)
    assert moved > 0
    logged = {k for row in tr.state.log_history for k in row}
    assert {"kl_rmse", "kl_mean", "barrier_active_frac", "rewards/trait_llr/mean", "rewards/incoherence/mean"} <= logged


def test_multi_strength_rollouts_get_the_dose_asked_for_hf(tiny):
    from steer_heal.engine import HFEngine
    from steer_heal.steering import extract_vector

    st = _student(tiny)
    st.bake()
    tok = tiny.tokenizer
    v = extract_vector(st.model, tok, "You are kind.", "You are cruel.", ["hi", "tell me a story", "why?"], [0, 1])
    multi_strength_check(HFEngine(st.model, tok), st, v, tok, kappa=3.0, alphas=(0.0, 3.0))


def test_lora_sync_refused_where_nothing_serves_the_live_lora():
    from types import SimpleNamespace

    from steer_heal.config import RunConfig
    from steer_heal.grpo.objective import OnlineConfigError
    from steer_heal.grpo.online import check_online_config

    for engine, objective in (("hf", "opd"), ("vllm", "nll"), ("vllm", "grpo")):
        cfg = RunConfig(engine=engine)
        cfg.online.objective, cfg.vllm.lora_sync = objective, True
        with pytest.raises(OnlineConfigError, match="fix: remove vllm_lora_sync"):
            check_online_config(cfg, SimpleNamespace(use_vllm=False))


def test_rollout_alphas_refused_where_they_mean_nothing():
    from types import SimpleNamespace

    from trl import GRPOConfig

    from steer_heal.config import RunConfig
    from steer_heal.grpo.objective import OnlineConfigError
    from steer_heal.grpo.online import check_online_config

    for objective, control, alphas in (("opd", "", [1.0, 2.0]), ("nll", "placebo", [1.0]), ("grpo", "", [-1.0, 1.0]),
                                       ("grpo", "", [0.0, 0.0])):
        cfg = RunConfig(control=control)
        cfg.online.objective, cfg.online.rollout_alphas = objective, alphas
        with pytest.raises(OnlineConfigError, match="fix: remove rollout_alphas"):
            check_online_config(cfg, SimpleNamespace(use_vllm=False))
    # 0 is the student's own reply in the group (VSPO): accepted with grpo and grpo+nll
    for objective in ("grpo", "grpo+nll"):
        cfg = RunConfig()
        cfg.online.objective, cfg.online.rollout_alphas = objective, [0.0, 0.5, 1.0, 2.0]
        check_online_config(cfg, GRPOConfig(output_dir="/tmp/x", use_cpu=True, beta=0.0))
