"""The student: original weights + baked history + one live LoRA.

History is kept as one frozen low-rank delta per target module (the rounds' LoRAs concatenated
along rank, scaling folded into B), merged into the working weights so generation runs at base
speed. The original weights of the target modules are kept as untouched copies, so `base()` is
bit-exact, and every bake recomputes W = W0 + B_hist @ A_hist from W0 (no drift across rounds).
The cumulative delta is a rank-R LoRA that loads with `PeftModel.from_pretrained` on the original
model and reproduces the baked student.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from steer_heal.models import num_layers
from steer_heal.steering.core import layer_band

ADAPTER = "default"  # PEFT saves the "default" adapter at the folder root: loadable as-is


class Student:
    def __init__(self, model, tok, r: int = 32, alpha: int = 64, band=(0.2, 0.8),
                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                 base_path: str = ""):
        self.tok = tok
        self.base_path = base_path
        self.lora_layers = layer_band(num_layers(model), tuple(band))
        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        targets = [t for t in target_modules if t in present]
        if not targets:
            raise ValueError(f"none of heal.target_modules {list(target_modules)} exist in the model; "
                             f"fix: pick from {sorted(present)}")
        self.lora_config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                      layers_to_transform=self.lora_layers, init_lora_weights=True, bias="none")
        self.model = get_peft_model(model, self.lora_config, adapter_name=ADAPTER)
        self.layers = {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        self.orig = {n: m.base_layer.weight.detach().clone() for n, m in self.layers.items()}
        self.hist: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.n_bakes = 0

    # ------------------------------------------------------------ modes
    @contextmanager
    def live_off(self):
        """The baked student (history in, live adapter off): the `prev` reference."""
        with self.model.disable_adapter():
            yield

    @contextmanager
    def base(self):
        """The original model, bit-exact: original target weights swapped in, live adapter off."""
        saved = {n: m.base_layer.weight.data for n, m in self.layers.items()}
        try:
            for n, m in self.layers.items():
                m.base_layer.weight.data = self.orig[n]
            with self.model.disable_adapter():
                yield
        finally:
            for n, m in self.layers.items():
                m.base_layer.weight.data = saved[n]

    def reference(self, mode: str = "prev"):
        if mode not in ("prev", "base"):
            raise ValueError(f"unknown reference '{mode}'; fix: use prev or base")
        return self.live_off() if mode == "prev" else self.base()

    # ------------------------------------------------------------ live adapter
    def live_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n and p.requires_grad]

    def reset_live(self, seed: int | None = None) -> None:
        """Fresh LoRA: A random, B = 0, so the student starts exactly at the baked model. With `seed`,
        A is drawn from that seed without touching the global RNG (identical on every rank)."""
        if seed is None:
            for m in self.layers.values():
                m.reset_lora_parameters(ADAPTER, True)
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.layers.values():
                m.reset_lora_parameters(ADAPTER, True)

    def _live_delta(self, m) -> tuple[torch.Tensor, torch.Tensor]:
        A = m.lora_A[ADAPTER].weight.detach().float().clone()  # reset_live re-inits A in place
        B = m.lora_B[ADAPTER].weight.detach().float() * m.scaling[ADAPTER]
        return A, B

    def save_live(self, path: str | Path) -> None:
        """This round's own adapter (relative to the previous baked student), PEFT format."""
        self.model.save_pretrained(str(path), selected_adapters=[ADAPTER])

    # ------------------------------------------------------------ bake
    def bake(self, seed: int | None = None) -> None:
        """Fold the live adapter into the history and the working weights; reset the live adapter."""
        for n, m in self.layers.items():
            A, B = self._live_delta(m)
            if n in self.hist:
                A0, B0 = self.hist[n]
                A, B = torch.cat([A0, A], 0), torch.cat([B0, B], 1)
            self.hist[n] = (A, B)
        self._merge_history()
        self.reset_live(seed)
        self.n_bakes += 1

    @torch.no_grad()
    def _merge_history(self) -> None:
        for n, m in self.layers.items():
            W0 = self.orig[n]
            if n in self.hist:
                A, B = self.hist[n]
                W = (W0.float() + B.to(W0.device) @ A.to(W0.device)).to(W0.dtype)
            else:
                W = W0.clone()
            m.base_layer.weight.data = W

    def merged_weights(self, live: bool = False):
        """(HF checkpoint name, tensor) of every parameter in the decoder layers the LoRA touches, baked
        weights included: an engine push. Whole layers, because engines fuse q/k/v and gate/up and
        reload a fused weight only from all of its parts. `live` adds the live LoRA's delta (an
        engine that serves the learner itself: on-policy distillation)."""
        want = {f".layers.{l}." for l in self.lora_layers}
        deltas = {}
        if live:
            for n, m in self.model.get_base_model().named_modules():
                if isinstance(m, LoraLayer):
                    A, B = self._live_delta(m)
                    deltas[f"{n}.base_layer.weight"] = B @ A
        for n, p in self.model.get_base_model().named_parameters():
            if "lora_" in n or not any(w in n for w in want):
                continue
            w = p.data
            if n in deltas:
                w = (w.float() + deltas[n].to(w.device)).to(w.dtype)
            yield n.replace(".base_layer.", "."), w

    # ------------------------------------------------------------ cumulative adapter
    def rank(self) -> int:
        return next(iter(self.hist.values()))[0].shape[0] if self.hist else 0

    def save_cumulative(self, path: str | Path) -> None:
        """The whole history as one rank-R LoRA on the original model (PEFT format)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        R = self.rank()
        cfg = LoraConfig(r=R, lora_alpha=R, target_modules=self.lora_config.target_modules, lora_dropout=0.0,
                         layers_to_transform=self.lora_layers, bias="none", base_model_name_or_path=self.base_path)
        cfg.save_pretrained(str(path))
        sd = {}
        for n, (A, B) in self.hist.items():
            sd[f"{n}.lora_A.weight"] = A.contiguous().cpu()
            sd[f"{n}.lora_B.weight"] = B.contiguous().cpu()
        save_file(sd, str(path / "adapter_model.safetensors"))
        (path / "steer_heal.json").write_text(json.dumps({"n_bakes": self.n_bakes, "rank": R}))

    def load_cumulative(self, path: str | Path) -> None:
        sd = load_file(str(Path(path) / "adapter_model.safetensors"))
        names = {k.rsplit(".lora_", 1)[0] for k in sd}
        if names - set(self.layers):
            raise ValueError(f"adapter '{path}' touches modules this student has no LoRA slot for "
                             f"({sorted(names - set(self.layers))[:2]}...); fix: build the Student with a lora_band "
                             "and target_modules covering the adapter's")
        self.hist = {n: (sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"]) for n in self.layers if n in names}
        self.n_bakes = json.loads((Path(path) / "steer_heal.json").read_text())["n_bakes"]
        self._merge_history()
        self.reset_live()


def export_merged(base_path: str, cumulative_dir: str | Path, out: str | Path, dtype=torch.float32) -> Path:
    """Write the original model with a cumulative adapter merged in: plain transformers loads it."""
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(cumulative_dir)).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(base_path).save_pretrained(str(out))
    return out
