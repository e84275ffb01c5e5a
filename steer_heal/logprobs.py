"""Teacher-forced token log-probabilities over completions, with bounded memory.

One implementation for the engine's logprobs, the reward's reference NLL and the heal's loss: run
the decoder for hidden states, then project to the vocabulary in row chunks so at most
`chunk x vocab` logits exist at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from steer_heal.models import causal_lm


def auto_chunk(vocab: int, budget: int = 1 << 26) -> int:
    """Rows per chunk so one chunk's float32 logits stay within `budget` elements (~256 MB)."""
    return max(16, budget // max(vocab, 1))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, S] right-padded prompt+completion
    attention_mask: torch.Tensor  # [B, S]
    completion_mask: torch.Tensor  # [B, S] 1 where the token is a completion token

    def to(self, device):
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))

    def targets(self):
        """Rows (b, s) of the hidden states that predict a completion token, and those tokens."""
        pred = self.completion_mask[:, 1:].bool()  # hidden at s predicts token s+1
        b, s = pred.nonzero(as_tuple=True)
        return b, s, self.input_ids[b, s + 1]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask for generation-style batches."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
        att[i, L - len(r):] = 1
    return ids, att


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> PackedBatch:
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    S = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    att = torch.zeros((B, S), dtype=torch.long)
    cm = torch.zeros((B, S), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        att[i, :n] = 1
        cm[i, len(p):n] = 1
    return PackedBatch(ids, att, cm)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state [B, S, d] (after the final norm), without computing logits."""
    lm = causal_lm(model)
    pos = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def lm_logits(model, h: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits from final hidden states, float32, with the model's final soft-cap if any."""
    lm = causal_lm(model)
    logits = lm.get_output_embeddings()(h).float()
    cap = getattr(lm.config, "final_logit_softcapping", None) or getattr(
        getattr(lm.config, "text_config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def completion_logprobs(model, batch: PackedBatch, chunk: int | None = None) -> list[torch.Tensor]:
    """Per row: log p(y_t | prefix) for each completion token (float32, CPU)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    h = final_hidden(model, batch.input_ids, batch.attention_mask)
    b, s, tgt = batch.targets()
    chunk = chunk or auto_chunk(causal_lm(model).get_output_embeddings().weight.shape[0])
    out = torch.empty(len(b), dtype=torch.float32, device=device)
    for i in range(0, len(b), chunk):
        lp = torch.log_softmax(lm_logits(model, h[b[i:i + chunk], s[i:i + chunk]]), -1)
        out[i:i + chunk] = lp.gather(-1, tgt[i:i + chunk, None])[:, 0]
    counts = batch.completion_mask[:, 1:].sum(1).tolist()
    return [t.cpu() for t in torch.split(out, counts)]
