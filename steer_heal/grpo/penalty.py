"""TRL's packed GRPO batch: which (row, position) pairs predict completion tokens."""
from __future__ import annotations

import torch


def trl_batch_rows(prompt_mask: torch.Tensor, completion_mask: torch.Tensor):
    """TRL packs [left-padded prompt | right-padded completion]. Returns the attention mask and the
    (row, position) pairs whose hidden state predicts a completion token (and that token's column)."""
    att = torch.cat([prompt_mask, completion_mask], 1)
    P = prompt_mask.shape[1]
    b, t = completion_mask.bool().nonzero(as_tuple=True)
    return att, b, P + t - 1, t
