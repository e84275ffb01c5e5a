"""Steerable vLLM model classes: the stock Llama / Qwen2 / Qwen3 / Gemma3 classes plus one
persistent steering buffer per band layer, added to the layer's hidden output by a forward hook.

Why a buffer installed at construction (not a hook added later): vLLM compiles the model's forward
(torch.compile) and replays it from CUDA graphs; code added after capture never runs there. A hook
that exists when the model is traced is part of the graph, and its buffer is read by address, so
`buffer.copy_(c * v)` changes the steering of the compiled / captured model without a rebuild.
A zero buffer adds exactly 0.0, so steering off is the unsteered model bit for bit.

vLLM decoder layers return (hidden, residual) and the residual stream is their sum: the delta is
added once, to `hidden`, matching the HF hook that adds it to the layer's output.

The classes are registered under new names (`SteerHeal<Arch>`), selected per engine through
`hf_overrides={"architectures": [...], "steer_heal_layers": [...]}`; vLLM's own classes are left
untouched. `register()` is also a `vllm.general_plugins` entry point so vLLM worker processes
(multiprocessing / external launchers) see the same registry.
"""
from __future__ import annotations

import importlib

import torch

# HF architecture name -> (vLLM module, class). Gemma3 4B+ checkpoints are multimodal
# (Gemma3ForConditionalGeneration); their text decoder is steered the same way.
SUPPORTED = {
    "LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("vllm.model_executor.models.gemma3", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("vllm.model_executor.models.gemma3_mm", "Gemma3ForConditionalGeneration"),
}
PREFIX = "SteerHeal"
BUFFER = "steer_heal_delta"


def steered_name(arch: str) -> str:
    return PREFIX + arch


def decoder_layer_list(model: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers (Llama/Qwen: model.layers; Gemma3-mm: language_model.model.layers)."""
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers:
            return mod
    raise ValueError(f"no decoder-layer list of length {n_layers} in {type(model).__name__}")


def _add_delta(module, args, output):
    # output = (hidden, residual); the residual stream is hidden + residual: add once, to hidden
    return (output[0] + module.steer_heal_delta,) + tuple(output[1:])


def install_steering_buffers(model: torch.nn.Module, hf_config, dtype: torch.dtype, device) -> list[int]:
    """Zero buffer + hook on each requested layer; returns the layers that got one (this PP stage's)."""
    text_cfg = getattr(hf_config, "text_config", None) or hf_config
    n_layers = text_cfg.num_hidden_layers
    hidden = text_cfg.hidden_size
    wanted = list(getattr(hf_config, "steer_heal_layers", None) or range(n_layers))
    bad = [l for l in wanted if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"steer_heal_layers {bad} outside 0..{n_layers - 1}")
    layers = decoder_layer_list(model, n_layers)
    installed = []
    for l in wanted:
        layer = layers[l]
        if not any(True for _ in layer.parameters()):  # pipeline-parallel placeholder on another stage
            continue
        layer.register_buffer(BUFFER, torch.zeros(hidden, dtype=dtype, device=device), persistent=False)
        layer.register_forward_hook(_add_delta)
        installed.append(l)
    model.steer_heal_layers = installed
    return installed


def _make_class(arch: str):
    mod_name, cls_name = SUPPORTED[arch]
    base = getattr(importlib.import_module(mod_name), cls_name)

    def __init__(self, *, vllm_config, prefix: str = ""):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        p = next(self.parameters())
        install_steering_buffers(self, vllm_config.model_config.hf_config, vllm_config.model_config.dtype, p.device)

    return type(steered_name(arch), (base,), {"__init__": __init__, "__module__": __name__})


_REGISTERED: dict[str, type] = {}
UNAVAILABLE: dict[str, str] = {}  # arch -> why its vLLM class could not be imported here


def register() -> None:
    """Register every SteerHeal<Arch> class with vLLM's ModelRegistry (idempotent)."""
    from vllm import ModelRegistry

    for arch in SUPPORTED:
        name = steered_name(arch)
        if name in _REGISTERED:
            continue
        try:
            cls = _make_class(arch)
        except (ImportError, AttributeError) as e:  # another vLLM version, or a missing extra (torchvision)
            UNAVAILABLE[arch] = f"{type(e).__name__}: {e}"
            continue
        _REGISTERED[name] = cls
        ModelRegistry.register_model(name, cls)
