"""HF forward hooks that apply the shared steering math; removed exactly on exit."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from steer_heal.models import decoder_layers
from steer_heal.steering.core import Steering, add_steering


def _hook(vec: torch.Tensor, coeff: float):
    def fn(module, args, output):
        # HF decoder layers return a tensor (transformers>=4.5x) or a tuple whose first item is hidden
        if isinstance(output, tuple):
            return (add_steering(output[0], vec, coeff),) + tuple(output[1:])
        return add_steering(output, vec, coeff)
    return fn


@contextmanager
def steer(model, steering: Steering | None):
    """Add c * v_l to decoder-layer outputs (every position) inside the block; no-op for None or c=0."""
    if steering is None or steering.coeff == 0:
        yield
        return
    layers = decoder_layers(model)
    handles = []
    try:
        for l in steering.vector.layers:
            handles.append(layers[l].register_forward_hook(_hook(steering.vector.for_layer(l), steering.coeff)))
        yield
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised after the last layer we read: the layers above it would be wasted compute."""


@contextmanager
def capture_last_token(model, layers: list[int], store: dict, stop_after: bool = True):
    """Record the decoder-layer output at the last position (the assistant tag with left padding).

    With `stop_after`, the forward pass is cut at the deepest layer read (the caller catches
    StopForward); extraction at mid-depth then costs about half a forward.
    """
    dl = decoder_layers(model)
    handles = []
    last = max(layers)

    def mk(l):
        def fn(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            store.setdefault(l, []).append(h[:, -1, :].detach().float().cpu())
            if stop_after and l == last:
                raise StopForward
        return fn

    try:
        for l in layers:
            handles.append(dl[l].register_forward_hook(mk(l)))
        yield store
    finally:
        for h in handles:
            h.remove()
