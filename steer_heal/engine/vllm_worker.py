"""Worker-side methods of the vLLM engine, mixed into vLLM's worker via `worker_extension_cls`.

The engine calls them by name through `LLM.collective_rpc("steer_heal_...", args=...)`: only a
method name and tensors cross to the worker, never pickled code (no VLLM_ALLOW_INSECURE_SERIALIZATION).
"""
from __future__ import annotations

import logging

import torch

from steer_heal.engine.vllm_models import BUFFER, decoder_layer_list


class SteerHealWorkerExtension:
    def _steer_layers(self):
        model = self.model_runner.get_model()
        cfg = self.model_runner.vllm_config.model_config.hf_config
        n = (getattr(cfg, "text_config", None) or cfg).num_hidden_layers
        return model, decoder_layer_list(model, n)

    def steer_heal_layers(self) -> list[int]:
        model, _ = self._steer_layers()
        return list(getattr(model, "steer_heal_layers", []))

    @torch.no_grad()
    def steer_heal_set(self, layers: list[int], deltas: torch.Tensor) -> None:
        """Write the per-layer additive deltas [len(layers), d] in place; every other buffer -> 0."""
        model, dl = self._steer_layers()
        have = set(getattr(model, "steer_heal_layers", []))
        missing = [l for l in layers if l not in have]
        if missing:
            raise ValueError(f"layers {missing} have no steering buffer (engine built for {sorted(have)})")
        rows = {l: i for i, l in enumerate(layers)}
        for l in have:
            buf = getattr(dl[l], BUFFER)
            if l in rows:
                buf.copy_(deltas[rows[l]].to(device=buf.device, dtype=buf.dtype))
            else:
                buf.zero_()

    @torch.no_grad()
    def steer_heal_load_weights(self, names: list[str], tensors: list[torch.Tensor]) -> int:
        """Load HF-named weights into the running model in place (fused qkv / gate_up handled by
        the model's own load_weights; kernel repacking redone layer by layer; tensor storage kept,
        so compiled graphs and CUDA graphs stay valid). Pass complete decoder layers."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import (
            _place_kernel_tensors,
            finalize_layerwise_reload,
            get_layerwise_info,
            initialize_layerwise_reload,
        )

        model, dl = self._steer_layers()
        cfg = self.model_runner.vllm_config
        if any(".layers." not in n for n in names):
            raise ValueError("push whole decoder layers only (names must contain '.layers.<i>.')")
        idx = sorted({layer_index(n) for n in names})
        check_complete({i: _load_numel(dl[i]) for i in idx}, names, tensors)  # partial: uninitialised memory
        # only the decoder layers being pushed go through vLLM's layerwise reload (the rest keep
        # their tensors untouched and are not reported as "failed to load")
        # layers with only buffers (the steering delta, rotary caches) load nothing and are put back
        # as they were; vLLM logs each as "failed to load", which here is expected
        quiet = logging.getLogger(finalize_layerwise_reload.__module__)
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with set_current_vllm_config(cfg):
                for i in idx:
                    initialize_layerwise_reload(dl[i])
                try:
                    loaded = model.load_weights(list(zip(names, tensors)))
                except BaseException:
                    # put every module's own tensors back (never leave a layer on the meta device)
                    for i in idx:
                        for mod in dl[i].modules():
                            info = get_layerwise_info(mod)
                            if info.kernel_tensors is not None:
                                _place_kernel_tensors(mod, info)
                            info.reset()
                    raise
                for i in idx:
                    finalize_layerwise_reload(dl[i], cfg.model_config)
        finally:
            quiet.setLevel(level)
        return len(loaded) if loaded is not None else len(names)


def layer_index(name: str) -> int:
    return int(name.split(".layers.", 1)[1].split(".", 1)[0])


def _load_numel(layer) -> int:
    """Checkpoint elements a decoder layer loads (vLLM's recorded pre-processing shapes, so kernel
    repacking on CPU does not change the count)."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.utils import get_tensor_load_numel

    n = sum(get_tensor_load_numel(t) for mod in layer.modules()
            for t in get_layerwise_info(mod).restore_metadata[0].values())
    return n or sum(p.numel() for p in layer.parameters())


def check_complete(want: dict[int, int], names: list[str], tensors: list[torch.Tensor]) -> None:
    """Every pushed layer must bring as many elements as the engine's layer loads (fused qkv / gate_up
    are the sums of their parts; tensor parallelism is refused upstream)."""
    got: dict[int, int] = {}
    for n, t in zip(names, tensors):
        got[layer_index(n)] = got.get(layer_index(n), 0) + t.numel()
    for i, w in sorted(want.items()):
        if got.get(i, 0) != w:
            raise ValueError(f"weight push: decoder layer {i} brings {got.get(i, 0)} elements, the engine's layer "
                             f"loads {w}; fix: push every parameter of the layer (Student.merged_weights does)")
