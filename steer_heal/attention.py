"""`sdpa` without copying grouped KV heads on CPU.

transformers' sdpa path passes `enable_gqa` to torch only when there is no attention mask (a CUDA
kernel limit), so every masked call on a grouped-query model (SmolLM2, Llama-3, Qwen, Gemma) first
copies each KV head `groups` times. Left-padded batches always carry a mask, so on CPU every decode
step of every layer paid that copy: 5.0 ms vs 0.65 ms per call at batch 32 x 280 cached tokens, the
largest cost of a 32-token MFV think phase after the matmuls. torch's CPU kernel takes the mask and
the grouped heads together and gives the same numbers (tests/test_attention.py). Elsewhere (CUDA,
position biases, no grouping) the call goes to transformers' own function unchanged.

`load_model` asks for NAME where the user asked for "sdpa"; the mask is built as sdpa's."""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_gqa"


def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.device.type != "cpu" or groups <= 1 or kwargs.get("position_bias") is not None
            or kwargs.get("cache") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_len:  # prefill into an empty static cache: sdpa's causal mask is upper-left
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=causal,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, sdpa_gqa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
