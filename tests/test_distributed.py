"""Bake-time optimizer handling and launch refusals (multi-GPU / DeepSpeed / vLLM), on plain tensors."""
from types import SimpleNamespace

import pytest
import torch

from steer_heal.engine.vllm_worker import check_complete
from steer_heal.grpo.distributed import (
    LaunchConfigError,
    check_launch,
    innermost_optimizer,
    reset_optimizer_state,
    sync_master_weights,
    zero_stage,
)


def _adam_run(reset):
    """3 AdamW steps, a bake-time reset of the optimizer, 2 more steps; returns the parameter."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0)
    grads = [torch.randn(5, 3) for _ in range(5)]
    for i, g in enumerate(grads):
        if i == 3:
            reset(opt, p)
        p.grad = g.clone()
        opt.step()
    return p.detach().clone()


class _Wrapper:  # accelerate's AcceleratedOptimizer / DeepSpeed's ZeRO optimizer hold the torch one as .optimizer
    def __init__(self, inner):
        self.optimizer = inner


def test_reset_zeroes_in_place_and_equals_fresh_adam():
    fresh = _adam_run(lambda opt, p: opt.state.pop(p))  # reference: the state deleted, re-created by the step
    zeroed = _adam_run(lambda opt, p: reset_optimizer_state(_Wrapper(_Wrapper(opt))))
    kept = _adam_run(lambda opt, p: None)
    assert torch.equal(zeroed, fresh)
    assert not torch.allclose(kept, fresh)  # the reset changes the update


def test_reset_keeps_the_state_tensors_it_zeroes():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(2)
    opt.step()
    m = opt.state[p]["exp_avg"]
    assert reset_optimizer_state(opt) == 3  # step, exp_avg, exp_avg_sq
    assert opt.state[p]["exp_avg"] is m and float(m.abs().sum()) == 0.0 and float(opt.state[p]["step"]) == 0.0
    assert innermost_optimizer(_Wrapper(opt)) is opt


def test_sync_master_weights_is_a_no_op_without_deepspeed():
    assert sync_master_weights([torch.nn.Parameter(torch.ones(2))]) == 0


def _args(stage=None, offload="none", tp=1):
    plugin = None if stage is None else SimpleNamespace(zero_stage=stage, offload_optimizer_device=offload,
                                                        offload_param_device="none")
    return SimpleNamespace(deepspeed_plugin=plugin, deepspeed=None, vllm_tensor_parallel_size=tp)


def test_launch_refusals_name_the_fix(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    for args, engine, needle in [(_args(3), "hf", "ZeRO-3"), (_args(2, offload="cpu"), "hf", "offload"),
                                 (_args(tp=2), "vllm", "tensor_parallel")]:
        with pytest.raises(LaunchConfigError, match=needle) as e:
            check_launch(args, engine)
        assert "fix:" in str(e.value) and "\n" not in str(e.value)
    for args, engine in [(_args(), "hf"), (_args(2), "vllm"), (_args(1), "hf"), (_args(tp=2), "hf")]:
        check_launch(args, engine)  # DDP, ZeRO-1/2, and TP only matters to the vLLM engine
    assert zero_stage(_args()) == 0 and zero_stage(_args(2)) == 2
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert zero_stage(_args()) == 3  # accelerate's launcher environment, before the plugin exists


def test_push_completeness_check():
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
             "model.layers.2.mlp.up_proj.weight"]
    ts = [torch.zeros(4, 4), torch.zeros(8, 4), torch.zeros(8, 4)]
    check_complete({1: 48, 2: 32}, names, ts)
    with pytest.raises(ValueError, match="decoder layer 2 brings 32 elements.*loads 48"):
        check_complete({1: 48, 2: 48}, names, ts)


def test_rollout_sleeps_the_engine_once_per_generation_batch():
    from steer_heal.engine.base import Rollout
    from steer_heal.grpo.rollout import SteerState, make_rollout_func

    class Engine:
        tok = SimpleNamespace(apply_chat_template=None)
        calls: list = []

        def generate(self, prompts, steering, samp, logprobs=True):
            self.calls.append("generate")
            return [Rollout(p, "x", [1], [2, 3], [-0.1, -0.2]) for p in prompts]

        def sleep(self):
            self.calls.append("sleep")

    class Student:
        def live_off(self):
            from contextlib import nullcontext
            return nullcontext()

    eng = Engine()
    import steer_heal.grpo.rollout as ro

    orig = ro.render_prompt
    ro.render_prompt = lambda tok, u, system=None: u
    try:
        f = make_rollout_func(eng, Student(), SteerState(vector=None, kappa=1.0), 4)
        trainer = SimpleNamespace(state=SimpleNamespace(global_step=0),
                                  accelerator=SimpleNamespace(process_index=0, device="cpu"))
        out = f([[{"role": "user", "content": "a"}]] * 2, trainer)
        f([[{"role": "user", "content": "b"}]] * 2, trainer)
    finally:
        ro.render_prompt = orig
    assert eng.calls == ["generate", "sleep"] * 2 and out["completion_ids"] == [[2, 3], [2, 3]]


def _reduce_worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank of test_metrics_and_divergence_are_reduced_over_ranks (module level: spawn pickles it)."""
    import json
    from collections import defaultdict

    import torch.distributed as dist

    from steer_heal.grpo.trainer import SteerHealGRPOTrainer
    from steer_heal.heal.train import HealDivergedError

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        fake = SimpleNamespace(timers={"rollout": 2.0 + 2 * rank}, _timers_seen={}, scorer=None,
                               accelerator=SimpleNamespace(device=torch.device("cpu")),
                               state=SimpleNamespace(global_step=5), trained_tokens=0)
        m = defaultdict(list)
        # rank 0: 2 sequences with rmse 0.1, 0.3 (sum 0.4), 1 of 2 over tau; rank 1: 2 sequences, sum 1.2, 0 of 2
        part = dict(kl_rmse=0.4 + 0.8 * rank, kl_mean=0.2 * (1 + rank), kl_p95=0.6 + rank, kl_max=1.0 + 2 * rank,
                    n_seq=2.0, active=1.0 - rank, n_D=2.0, kl_penalty=0.05 * (1 - rank), n_trained=10.0 + 5 * rank)
        SteerHealGRPOTrainer._reduce_and_check(fake, m, part, torch.tensor(1.0), kl_on=True)
        nan = torch.tensor(float("nan")) if rank == 1 else torch.tensor(1.0)
        try:
            SteerHealGRPOTrainer._reduce_and_check(fake, defaultdict(list), part, nan, kl_on=True)
            err = ""
        except HealDivergedError as e:
            err = str(e)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(dict(m=dict(m), err=err, trained=fake.trained_tokens), f)
    finally:
        dist.destroy_process_group()


def test_metrics_and_divergence_are_reduced_over_ranks(tmp_path):
    """Two gloo ranks with different partial sums log the same global means (worked by hand), and a
    NaN on rank 1 raises on both ranks."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_reduce_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for x in r:
        m = x["m"]
        assert m["kl_rmse"] == pytest.approx([(0.4 + 1.2) / 4])  # sum over 4 sequences / 4
        assert m["kl_mean"] == pytest.approx([(0.2 + 0.4) / 4])
        assert m["kl_p95"] == pytest.approx([(0.6 + 1.6) / 4]) and m["kl_max"] == pytest.approx([(1.0 + 3.0) / 4])
        assert m["barrier_active_frac"] == pytest.approx([1 / 4])
        assert m["kl_penalty"] == pytest.approx([0.05 / 2])  # mean of the ranks' penalties
        assert m["time/rollout"] == pytest.approx([(2.0 + 4.0) / 2])  # seconds per rank, averaged
        assert x["err"].startswith("GRPO loss is not finite on 1 of 2 rank(s) at step 5; fix:")
        assert x["trained"] == 2 * (10 + 15)  # both ranks' tokens, on every rank, counted at each of the 2 calls
