"""Steering math on plain tensors, shared by the HF hooks and the vLLM backend.

A steering vector is one row per layer in a band: v_l = mean(h_pos) - mean(h_neg), unnormalised
(its natural scale is the dose unit). Applying it: h_l <- h_l + c * v_l at every position.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class LayerBandError(ValueError):
    """A layer band outside the model; the message names the fix."""


def layer_band(n_layers: int, band: tuple[float, float] = (0.45, 0.55), layers: list[int] | None = None) -> list[int]:
    """Layers in the middle `band` fraction of depth (at least one), or the explicit `layers`."""
    if layers:
        bad = [l for l in layers if not 0 <= int(l) < n_layers]
        if bad:
            raise LayerBandError(f"layers {bad} outside the model's 0..{n_layers - 1}; "
                                 f"fix: pick layers in 0..{n_layers - 1} or use steer.layer_band")
        return sorted({int(l) for l in layers})
    lo, hi = band
    if not (0.0 <= lo < hi <= 1.0):
        raise LayerBandError(f"layer band {band} is not 0 <= lo < hi <= 1; fix: e.g. layer_band=[0.45, 0.55]")
    # layers whose centre (l + 0.5) / n lies in the band; at least the one nearest the band's middle
    picked = [l for l in range(n_layers) if lo <= (l + 0.5) / n_layers <= hi]
    return picked or [min(n_layers - 1, int((lo + hi) / 2 * n_layers))]


def mean_diff(h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """[N, L, d] x2 -> [L, d], computed in float32."""
    return h_pos.float().mean(0) - h_neg.float().mean(0)


def steering_delta(vec: torch.Tensor, coeff: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """c * v computed in float32, then cast: the one formula both engines add to the residual stream."""
    d = coeff * vec.float()
    return d if dtype is None else d.to(dtype)


def add_steering(hidden: torch.Tensor, vec: torch.Tensor, coeff: float) -> torch.Tensor:
    """h + c * v, broadcast over batch and positions, in the hidden's dtype."""
    return hidden + steering_delta(vec.to(hidden.device), coeff, hidden.dtype)


def cosine_flat(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))))  # rounding can pass 1


@dataclass
class SteeringVector:
    layers: list[int]
    vectors: torch.Tensor  # [len(layers), d] float32
    meta: dict = field(default_factory=dict)
    center: torch.Tensor | None = None  # [len(layers), d] midpoint of the two persona means (for projections)

    def for_layer(self, layer: int) -> torch.Tensor:
        return self.vectors[self.layers.index(layer)]

    def cosine(self, other: "SteeringVector") -> float:
        if self.layers != other.layers:
            raise ValueError(f"layers differ: {self.layers} vs {other.layers}")
        return cosine_flat(self.vectors, other.vectors)

    def save(self, path: str | Path) -> None:
        meta = {k: json.dumps(v) for k, v in {**self.meta, "layers": self.layers}.items()}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"vectors": self.vectors.detach().float().cpu().contiguous()}
        if self.center is not None:
            tensors["center"] = self.center.detach().float().cpu().contiguous()
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVector":
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            vec = f.get_tensor("vectors")
            center = f.get_tensor("center") if "center" in f.keys() else None
        layers = meta.pop("layers")
        return cls(layers=layers, vectors=vec, meta=meta, center=center)


@dataclass
class Steering:
    """A vector plus its coefficient: what an engine applies."""
    vector: SteeringVector
    coeff: float
