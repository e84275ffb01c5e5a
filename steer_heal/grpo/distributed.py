"""What a bake must do under each launcher, and which launch combinations are refused.

A bake folds the live LoRA into the history and starts a fresh LoRA with fresh Adam moments. Under
plain DDP that is an in-place write to the LoRA parameters and an optimizer-state reset. Under
DeepSpeed ZeRO-1/2 the optimizer steps fp32 master partitions and copies them back into the module
parameters after every step, so an in-place write alone is undone at the next step (the baked LoRA
would be both in the history and live). The fresh LoRA is therefore also written into the masters
(`deepspeed.utils.safe_set_full_fp32_param`), and the optimizer state is zeroed in place: every
trainable parameter is live LoRA, so zeroing all of it (moments and step count) is exactly "fresh
Adam moments", whether the state is keyed per parameter (torch) or per flat partition (DeepSpeed).

ZeRO-3 partitions the frozen weights too: the student's original-weight copies, its history merge,
the reference / base modes and the rank-0-only evaluations all need whole weights on every rank.
It is refused at start-up until that is built.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class LaunchConfigError(ValueError):
    """A launcher / engine combination steer-heal cannot run correctly; the message names the fix."""


def zero_stage(args) -> int:
    """DeepSpeed ZeRO stage of this run (0: not DeepSpeed), from the accelerate plugin or TrainingArguments."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        return int(plugin.zero_stage or 0)
    ds = getattr(args, "deepspeed", None)
    if ds:
        cfg = ds if isinstance(ds, dict) else json.loads(Path(ds).read_text())
        return int(cfg.get("zero_optimization", {}).get("stage", 0))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    return 0


def _offload(args) -> str:
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        return str(plugin.offload_optimizer_device or "none") + "/" + str(plugin.offload_param_device or "none")
    return os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") + "/" + \
        os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")


def check_launch(args, engine: str) -> None:
    """One-line refusals for launch combinations whose results would be wrong or that would hang."""
    stage = zero_stage(args)
    if stage == 3:
        raise LaunchConfigError("DeepSpeed ZeRO-3 is not supported: the student needs whole weights on every rank "
                                "(original-weight copies, history merge, reference and base modes); fix: launch with "
                                "accelerate_configs/deepspeed_zero2.yaml or multi_gpu.yaml")
    offload = _offload(args) if stage else "none/none"
    if offload != "none/none":
        raise LaunchConfigError(f"DeepSpeed optimizer/parameter offload ({offload}) is not verified with bakes; "
                                "fix: set offload_optimizer_device and offload_param_device to none")
    tp = int(getattr(args, "vllm_tensor_parallel_size", 1) or 1)
    if engine == "vllm" and tp > 1:
        raise LaunchConfigError(f"vllm_tensor_parallel_size={tp}: the steered engine runs one full copy per rank "
                                "(weight push and push check are per rank); fix: vllm_tensor_parallel_size: 1")


def innermost_optimizer(optimizer):
    """The torch optimizer that holds the Adam state, under accelerate's and DeepSpeed's wrappers."""
    opt, seen = optimizer, set()
    while getattr(opt, "optimizer", None) is not None and id(opt) not in seen:  # AcceleratedOptimizer, ZeRO
        seen.add(id(opt))
        opt = opt.optimizer
    return opt


@torch.no_grad()
def reset_optimizer_state(optimizer) -> int:
    """Zero every optimizer state tensor in place (moments and step): fresh Adam for a fresh LoRA.
    In place, because DeepSpeed keeps references to its flat state tensors. Returns the tensors zeroed."""
    opt = innermost_optimizer(optimizer)
    n = 0
    for st in getattr(opt, "state", {}).values():
        for key, v in list(st.items()):
            if torch.is_tensor(v):
                v.zero_()
                n += 1
            elif isinstance(v, (int, float)):
                st[key] = type(v)(0)
                n += 1
    return n


@torch.no_grad()
def sync_master_weights(params) -> int:
    """Write the module parameters' values into DeepSpeed's fp32 master copies (ZeRO-1/2), so the
    next optimizer step starts from them. A no-op without DeepSpeed. Returns the parameters written."""
    params = [p for p in params if getattr(p, "_hp_mapping", None) is not None]
    if not params:
        return 0
    from deepspeed.utils import safe_set_full_fp32_param

    for p in params:
        safe_set_full_fp32_param(p, p.detach().float())
    return len(params)
