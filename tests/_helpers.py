"""Plain helpers shared by test modules (not fixtures)."""
import torch


def trl_batch(tok, prompts, completions):
    """TRL's layout: left-padded prompts | right-padded completions -> (prompt_ids, prompt_mask,
    completion_ids, completion_mask)."""
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)
    pad = tok.pad_token_id
    pi = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    pm = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    ci = torch.tensor([c + [pad] * (C - len(c)) for c in completions])
    cm = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in completions])
    return pi, pm, ci, cm
