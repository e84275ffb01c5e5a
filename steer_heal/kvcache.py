"""KV-cache building blocks shared by scoring (reward/scores.py) and generation (engine/hf.py): run the
tokens several rows share once, then continue each row from a copy of that cache.

Rows are laid out in stages, each padded at its own edge and masked, with positions counted over
real tokens only; a row's numbers then do not depend on the holes (tested against a plain
left-padded batch). Sliding-window models (gemma-3, mistral) count their window in cache slots,
so a hole would shift it: they get no shared stages."""
from __future__ import annotations

import copy

import torch

from steer_heal.models import causal_lm

MIN_HEAD = 16  # a group's shared head shorter than this is not worth its own stage


def sliding_window(model) -> bool:
    """Whether some layer attends within a window counted in cache slots (gemma-3, mistral)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(cfg, "sliding_window", None) or getattr(cfg, "use_sliding_window", True) is False:
        return False
    types = getattr(cfg, "layer_types", None)
    return types is None or any("sliding" in t for t in types)


def prefix_pass(dec, ids: list[int], device):
    """The KV cache of one token row at positions 0..n-1 (batch 1)."""
    return dec(input_ids=torch.tensor([ids], device=device), position_ids=torch.arange(len(ids), device=device)[None],
               use_cache=True).past_key_values


def stack_caches(caches, lengths: list[int]):
    """One cache holding each batch-1 cache as a row, right-padded to the longest (the padding is
    masked by the returned [rows, L] attention mask)."""
    L = max(lengths)
    mask = torch.zeros((len(caches), L), dtype=torch.long)
    for j, n in enumerate(lengths):
        mask[j, :n] = 1
    if len(caches) == 1:
        return caches[0], mask
    out = copy.deepcopy(caches[0])
    for li, layer in enumerate(out.layers):
        for attr in ("keys", "values"):
            parts = [getattr(c.layers[li], attr) for c in caches]
            setattr(layer, attr, torch.cat([torch.nn.functional.pad(x, (0, 0, 0, L - x.shape[-2])) for x in parts]))
    return out, mask


def _lcp(a: list[int], b: list[int]) -> int:
    n, m = 0, min(len(a), len(b))
    while n < m and a[n] == b[n]:
        n += 1
    return n


def share_groups(rows: list[list[int]], min_head: int = MIN_HEAD) -> tuple[int, list[int], list[int]]:
    """(k0, group of each row, head end of each group): k0 tokens start every row; rows whose common
    prefix runs at least `min_head` tokens past k0 form a group whose head rows[.][k0:end] runs once.
    Every row keeps at least one token of its own (the one whose logits start its generation)."""
    k0 = min([_lcp(rows[0], r) for r in rows] + [len(r) - 1 for r in rows])
    firsts: list[int] = []  # first row of each group
    ends: list[int] = []
    group = []
    for i, r in enumerate(rows):
        for g, f in enumerate(firsts):
            n = min(_lcp(rows[f], r), len(r) - 1)
            if n - k0 >= min_head:
                group.append(g)
                ends[g] = min(ends[g], n)
                break
        else:
            group.append(len(firsts))
            firsts.append(i)
            ends.append(len(r) - 1)
    sizes = [group.count(g) for g in range(len(firsts))]
    ends = [e if s > 1 else k0 for e, s in zip(ends, sizes)]  # a group of one has no head: nothing to share
    return k0, group, ends


@torch.no_grad()
def shared_prefill(model, rows: list[list[int]], pad_id: int, min_head: int = MIN_HEAD):
    """Prefill the parts of `rows` that several rows share: the prefix common to all at batch 1, then
    each group's head once. Returns (ids [B, S], attention mask [B, S], cache of the first C < S slots)
    with the layout [common prefix | head, right-padded | rest, left-padded], ready for
    `generate(input_ids=ids, attention_mask=mask, past_key_values=cache)`, which runs only the rest.
    None when nothing is shared (or the model has a sliding window): use a plain left-padded batch."""
    if len(rows) < 2 or sliding_window(causal_lm(model)):
        return None
    k0, group, ends = share_groups(rows, min_head)
    if k0 == 0:  # (chat rows all open with the same token) a head-stage pad would attend to nothing
        return None
    G = len(ends)
    heads = [rows[next(i for i, g in enumerate(group) if g == gi)][k0:e] for gi, e in enumerate(ends)]
    H = max(len(h) for h in heads)
    if k0 < min_head and H == 0:
        return None
    rests = [r[ends[g]:] for r, g in zip(rows, group)]
    R = max(len(t) for t in rests)
    B, S = len(rows), k0 + H + R
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    att = torch.zeros((B, S), dtype=torch.long)
    ids[:, :k0] = torch.tensor(rows[0][:k0], dtype=torch.long)
    att[:, :k0] = 1
    for b, (g, t) in enumerate(zip(group, rests)):
        h = heads[g]
        ids[b, k0:k0 + len(h)] = torch.tensor(h, dtype=torch.long)
        att[b, k0:k0 + len(h)] = 1
        ids[b, S - len(t):] = torch.tensor(t, dtype=torch.long)
        att[b, S - len(t):] = 1
    dec = causal_lm(model).get_decoder()
    device = next(model.parameters()).device
    gidx = torch.tensor(group, dtype=torch.long, device=device)
    cache = prefix_pass(dec, rows[0][:k0], device)
    cache.batch_repeat_interleave(G)
    if H:
        hid = torch.full((G, H), pad_id, dtype=torch.long)
        hatt = torch.zeros((G, k0 + H), dtype=torch.long)
        hatt[:, :k0] = 1
        for g, h in enumerate(heads):
            hid[g, :len(h)] = torch.tensor(h, dtype=torch.long)
            hatt[g, k0:k0 + len(h)] = 1
        pos = (k0 + torch.arange(H))[None].expand(G, H)
        cache = dec(input_ids=hid.to(device), attention_mask=hatt.to(device), position_ids=pos.to(device),
                    past_key_values=cache, use_cache=True).past_key_values
    cache.batch_select_indices(gidx)  # each row continues from its group's cache
    return ids, att, cache
