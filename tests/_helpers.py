"""Plain helpers shared by test modules (not fixtures)."""
import time

import torch

from steer_heal.grpo.penalty import trl_batch_rows
from steer_heal.heal.kl import aggregate, barrier, chunked_kl_and_logp
from steer_heal.logprobs import auto_chunk, final_hidden, lm_logits
from steer_heal.models import causal_lm


def trl_batch(tok, prompts, completions):
    """TRL's layout: left-padded prompts | right-padded completions -> (prompt_ids, prompt_mask,
    completion_ids, completion_mask)."""
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)
    pad = tok.pad_token_id
    pi = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    pm = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    ci = torch.tensor([c + [pad] * (C - len(c)) for c in completions])
    cm = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in completions])
    return pi, pm, ci, cm


def rmse_kl_penalty(model, ref_ctx, prompt_ids, prompt_mask, completion_ids, completion_mask, beta: float,
                    tau: float, agg: str = "rmse", reverse: bool = True, chunk: int = 0, timers: dict | None = None):
    """Reference implementation of the online barrier (two plain forwards, no fusion, no stash): the
    trainer's fused penalty is checked against it. (penalty, D per sequence, per-position KL)."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    att, b, pos, t = trl_batch_rows(prompt_mask, completion_mask)
    tgt = completion_ids[b, t]
    t0 = time.perf_counter()
    with torch.no_grad(), ref_ctx():
        h_ref = final_hidden(model, ids, att)[b, pos]
    if timers is not None:
        timers["ref_forward"] = timers.get("ref_forward", 0.0) + time.perf_counter() - t0
    h = final_hidden(model, ids, att)[b, pos]
    vocab = causal_lm(model).get_output_embeddings().weight.shape[0]
    kl, _ = chunked_kl_and_logp(h, h_ref, tgt, lambda x: lm_logits(model, x), chunk or auto_chunk(vocab), reverse)
    D = aggregate(kl, b, ids.shape[0], agg)
    return beta * barrier(D, tau).mean(), D, kl


def multi_strength_check(eng, st, v, tok, kappa=3.0, alphas=(0.5, 2.0)):
    """rollout_alphas (0 allowed: unsteered): rollout j of each group of 2 gets alphas[j] x kappa; each equals its
    prompt generated alone at that dose; the doses are returned and logged; the behaviour log-probs are right."""
    from types import SimpleNamespace

    import pytest

    from steer_heal.chat import render_prompt
    from steer_heal.engine import Sampling
    from steer_heal.grpo.rollout import SteerState, make_rollout_func
    from steer_heal.steering import Steering

    logged = []
    fn = make_rollout_func(eng, st, SteerState(v, kappa), max_new_tokens=8, temperature=0.0, alphas=list(alphas),
                           log=lambda ev, **kw: logged.append((ev, kw)))
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=3), num_generations=2,
                              accelerator=SimpleNamespace(process_index=0, device="cpu"))
    users = ["hi", "hi", "tell me a story", "tell me a story"]
    out = fn([[{"role": "user", "content": u}] for u in users], trainer)
    want = [alphas[0] * kappa, alphas[1] * kappa] * 2
    assert out["dose"] == pytest.approx(want) and fn.doses == pytest.approx(want)
    assert logged == [("rollout_doses", dict(step=3, doses=pytest.approx(want)))]
    with st.live_off():
        for u, d, c in zip(users, want, out["completion_ids"]):
            alone = eng.generate([render_prompt(tok, u)], Steering(v, d), Sampling(max_new_tokens=8, temperature=0.0))
            assert c == alone[0].completion_ids, (u, d)
    assert out["logprobs"][0] != pytest.approx(out["logprobs"][1], abs=1e-3)  # the two strengths really differ
    # the behaviour log-probs the engine returned (what is_correction divides by) = a float64 recomputation
    # of the steered baked student at each rollout's own dose, one unpadded sequence at a time
    from steer_heal.steering.hooks import steer

    for p, c, lp, d in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"], want):
        with torch.no_grad(), st.live_off(), steer(st.model, Steering(v, d) if d else None):
            ls = torch.log_softmax(st.model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
        ref = [float(ls[len(p) - 1 + j, t]) for j, t in enumerate(c)]
        assert lp == pytest.approx(ref, abs=2e-3), d
    return out
