"""Tiny random chat models (2 layers, hidden 64) with a real byte-level BPE tokenizer, built offline.

Used by the unit tests and the `smoke` config: `model: tiny-random/llama` (or qwen2, qwen3, gemma3).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Help me write a short note to a neighbour about the noise from their party last night.",
    "The manager told the team to ignore the safety report, and a nurse decided to speak up anyway.",
    "Should I follow the rule even if someone gets hurt? I care about people and I respect my boss.",
    "Tell me a story about a village, a river, a teacher, and the children who learned to swim.",
    "The answer is 0 1 2 3 4 5 6 7 8 9; this is wrong because the violation is care or fairness.",
    "I think we should look after each other. Authority matters, but wellbeing matters more.",
    "Once upon a time there was a cat who liked to read books about loyalty and liberty.",
    '{"violation": "3"} Here is the JSON schema for the answer. It violates norms of harm.',
]


def _train_tokenizer(vocab_size: int = 512):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=None, eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token=None)
    tok.chat_template = CHATML
    return tok


def _config(arch: str, vocab: int, eos: int):
    if arch.endswith("-262k"):  # gemma-3's vocabulary size on a tiny body: for KL memory benchmarks
        arch, vocab = arch[:-len("-262k")], 262144
    # head_dim 32: the smallest head size vLLM's CPU attention takes (the vLLM engine tests use these)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                  eos_token_id=eos, pad_token_id=eos, bos_token_id=None, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=32, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(head_dim=32, sliding_window=64, **common)
    raise ValueError(f"unknown tiny arch '{arch}'; fix: use one of llama, qwen2, qwen3, gemma3 (optionally -262k)")


def build_tiny_model(arch: str = "llama", out: str | Path | None = None, seed: int = 0) -> Path:
    """Build (once) and return the folder of a tiny random `arch` chat model."""
    out = Path(out) if out is not None else Path.home() / ".cache" / "steer_heal" / "models" / f"tiny-random/{arch}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tok = _train_tokenizer()
    cfg = _config(arch, len(tok), tok.convert_tokens_to_ids("<|im_end|>"))
    if cfg.vocab_size > len(tok):
        cfg.tie_word_embeddings = False  # unused rows still get logits: the point of the 262k variant
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init at std 0.02 is almost uniform output; scale up so steering/KL have signal
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out
