"""Mean-diff vector extraction at the assistant tag, batched."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from steer_heal.chat import render_prompt
from steer_heal.steering.core import SteeringVector, cosine_flat, mean_diff
from steer_heal.steering.hooks import StopForward, capture_last_token


class PersonaError(ValueError):
    """An unusable persona pair; the message names the fix."""


def check_personas(pos: str, neg: str) -> None:
    if not pos or not pos.strip() or not neg or not neg.strip():
        raise PersonaError("empty persona; fix: set both persona_pos and persona_neg (or pick a preset)")
    if pos.strip().lower() == neg.strip().lower():
        raise PersonaError("persona_pos and persona_neg are identical, so the vector would be zero; "
                           "fix: give two opposite personas on one axis")


@torch.no_grad()
def last_token_states(model, tok, prompts: list[str], layers: list[int], batch_size: int = 32,
                      desc: str | None = None) -> torch.Tensor:
    """[N, len(layers), d] float32 decoder-layer outputs at each prompt's last token."""
    device = next(model.parameters()).device
    chunks = []
    it = range(0, len(prompts), batch_size)
    for i in tqdm(it, desc=desc, disable=desc is None, leave=False):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        assert tok.padding_side == "left", "extraction reads position -1: the tokenizer must pad left"
        store: dict = {}
        try:
            with capture_last_token(model, layers, store):
                model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
                      position_ids=(enc.attention_mask.cumsum(-1) - 1).clamp_min(0).to(device), use_cache=False)
        except StopForward:
            pass
        chunks.append(torch.stack([store[l][0] for l in layers], dim=1))
    return torch.cat(chunks, 0)


def extract_vector(model, tok, persona_pos: str, persona_neg: str, contexts: list[str], layers: list[int],
                   batch_size: int = 32, model_id: str = "", progress: bool = False) -> SteeringVector:
    """v_l = mean_x h_l(pos, x) - mean_x h_l(neg, x) at the generation prompt's last token."""
    check_personas(persona_pos, persona_neg)
    if not contexts:
        raise PersonaError("no extraction contexts; fix: give the preset a non-empty `contexts` list")
    pos = [render_prompt(tok, x, system=persona_pos) for x in contexts]
    neg = [render_prompt(tok, x, system=persona_neg) for x in contexts]
    desc = "extract" if progress else None
    h_pos = last_token_states(model, tok, pos, layers, batch_size, desc)
    h_neg = last_token_states(model, tok, neg, layers, batch_size, desc)
    meta = dict(model_id=model_id, persona_pos=persona_pos, persona_neg=persona_neg, n_contexts=len(contexts))
    center = (h_pos.float().mean(0) + h_neg.float().mean(0)) / 2
    return SteeringVector(layers=list(layers), vectors=mean_diff(h_pos, h_neg), meta=meta, center=center)


@torch.no_grad()
def activation_shift(model, tok, prompts: list[str], vector: SteeringVector, student_ctx, base_ctx,
                     batch_size: int = 32) -> dict:
    """Does the student carry the vector? Its mean shift from the base model at the vector's layers, at
    the last token of each rendered prompt (the assistant tag, where the vector is read):
    shift = mean_x [h_student(x) - h_base(x)], flattened over layers. Returns shift_cos (cosine with the
    vector) and shift_dose (<shift, v> / |v|^2: the dose the shift amounts to along v)."""
    with student_ctx():
        hs = last_token_states(model, tok, prompts, vector.layers, batch_size)
    with base_ctx():
        hb = last_token_states(model, tok, prompts, vector.layers, batch_size)
    shift = (hs.double() - hb.double()).mean(0).flatten()
    v = vector.vectors.double().flatten()
    return dict(shift_cos=cosine_flat(shift, v) if float(shift.norm()) > 0 else 0.0,
                shift_dose=float(shift @ v / (v @ v)))
