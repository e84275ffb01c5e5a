"""Chat-template rendering shared by extraction, generation, scoring and evaluation."""
from __future__ import annotations


def render_prompt(tok, user: str, system: str | None = None, history: list[tuple[str, str]] = ()) -> str:
    """The chat prompt for one user turn (after optional earlier (user, assistant) turns), ending
    with the generation prompt (the assistant tag)."""
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": user})
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def encode_prompt(tok, text: str) -> list[int]:
    # the template already holds any BOS: never add special tokens twice
    return tok(text, add_special_tokens=False).input_ids
