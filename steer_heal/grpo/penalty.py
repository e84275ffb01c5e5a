"""The GRPO penalty: beta * relu(D - tau), D = per-sequence aggregate of the exact full-vocabulary
KL to the reference over completion positions. Same KL and aggregation code as the iterative heal."""
from __future__ import annotations

import torch

from steer_heal.heal.kl import aggregate, barrier, chunked_kl_and_logp
from steer_heal.logprobs import auto_chunk, final_hidden, lm_logits
from steer_heal.models import causal_lm


def trl_batch_rows(prompt_mask: torch.Tensor, completion_mask: torch.Tensor):
    """TRL packs [left-padded prompt | right-padded completion]. Returns the attention mask and the
    (row, position) pairs whose hidden state predicts a completion token (and that token's column)."""
    att = torch.cat([prompt_mask, completion_mask], 1)
    P = prompt_mask.shape[1]
    b, t = completion_mask.bool().nonzero(as_tuple=True)
    return att, b, P + t - 1, t


def rmse_kl_penalty(model, ref_ctx, prompt_ids, prompt_mask, completion_ids, completion_mask, beta: float,
                    tau: float, agg: str = "rmse", reverse: bool = True, chunk: int = 0, timers: dict | None = None):
    """(penalty scalar, D per sequence, per-position KL). `ref_ctx()` puts `model` in reference mode."""
    import time

    ids = torch.cat([prompt_ids, completion_ids], 1)
    att, b, pos, t = trl_batch_rows(prompt_mask, completion_mask)
    tgt = completion_ids[b, t]
    t0 = time.perf_counter()
    with torch.no_grad(), ref_ctx():
        h_ref = final_hidden(model, ids, att)[b, pos]
    if timers is not None:
        timers["ref_forward"] = timers.get("ref_forward", 0.0) + time.perf_counter() - t0
    h = final_hidden(model, ids, att)[b, pos]
    vocab = causal_lm(model).get_output_embeddings().weight.shape[0]
    kl, _ = chunked_kl_and_logp(h, h_ref, tgt, lambda x: lm_logits(model, x), chunk or auto_chunk(vocab), reverse)
    D = aggregate(kl, b, ids.shape[0], agg)
    return beta * barrier(D, tau).mean(), D, kl
