"""Per-completion score primitives; reward.components.Scorer combines them for the filter and the reward.

Text scores (no model): repetition, verbalisation, refusal.
Model scores (under the reference model: no steering, no live adapter): tail NLL, persona LLR.
"""
from __future__ import annotations

import copy
import re
from collections import Counter

import torch

from steer_heal.chat import encode_prompt, render_prompt
from steer_heal.logprobs import auto_chunk, completion_logprobs, lm_logits, pack
from steer_heal.models import causal_lm


# ---------------------------------------------------------------- text scores
def _ngram_top_frac(seq, n: int) -> float:
    if len(seq) < n + 1:
        return 0.0
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    top = Counter(grams).most_common(1)[0][1]
    return top / len(grams) if top > 1 else 0.0  # a gram seen once is no repetition (short replies)


def repetition(text: str) -> float:
    """Largest most-common n-gram fraction over word and char n in {2,3,4}; 1.0 for an empty text.

    Catches "TTTTT" (char) and "their instead their instead" (word) loops; ordinary prose scores
    ~0.03-0.1 (char bigrams like "e " are common).
    """
    t = text.strip()
    if not t:
        return 1.0
    words = t.lower().split()
    chars = list(re.sub(r"\s+", " ", t.lower()))
    return max(max(_ngram_top_frac(words, n) for n in (2, 3, 4)),
               max(_ngram_top_frac(chars, n) for n in (2, 3, 4)))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def loopiness(text: str) -> float:
    """Loop/stutter strength in [0, 1]: the largest of `repetition`, the share of word bigrams that
    repeat an earlier one ("so much so much so much"), and the share of words equal to the word
    before ("door door door"). Prose scores ~0-0.1."""
    w = _words(text)
    big = [tuple(w[i:i + 2]) for i in range(len(w) - 1)]
    dup = 1 - len(set(big)) / len(big) if big else 0.0
    stutter = sum(a == b for a, b in zip(w, w[1:])) / (len(w) - 1) if len(w) > 1 else 0.0
    return max(repetition(text), dup, stutter)


_NARRATE = [
    r"\bI(?:'m| am) (?:someone|a person|the kind of (?:person|someone)|somebody|an? (?:individual|person))"
    r" (?:who|that)\b",
    r"\bas (?:someone|a person|somebody|an? individual) (?:who|that)\b",
    r"\bmy (?:persona|character|role|nature|personality) (?:is|means)\b",
    r"\bbeing (?:someone|a person) who\b",
    r"\bI (?:always|never) (?:defer|put|look after|prioriti[sz]e|follow)\b",
    r"\b(?:the|my) (?:system prompt|instructions say)\b",
]
_NARRATE_RE = [re.compile(p, re.I) for p in _NARRATE]
_STOP = set("a an the of to and or in on for at by with from as is are be it its that this who which when even "
            "it's i me my you your they them their we our".split())


def _content_trigrams(text: str) -> set[tuple[str, ...]]:
    w = [x for x in re.findall(r"[a-z']+", text.lower()) if x not in _STOP]
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


def verbalisation(text: str, personas: tuple[str, ...] = ()) -> float:
    """In [0, 1]: the completion narrates a persona ("I am someone who...") instead of acting it out.

    1.0 on a narration pattern; otherwise the overlap with the persona texts: the share of a
    persona's content-word trigrams that the completion copies, doubled and capped at 1 (copying
    half the persona's phrasing counts as full narration).
    """
    if any(r.search(text) for r in _NARRATE_RE):
        return 1.0
    cw = _content_trigrams(text)
    best = 0.0
    for p in personas:
        pg = _content_trigrams(p)
        if pg:
            best = max(best, len(pg & cw) / len(pg))
    return min(1.0, 2.0 * best)


_REFUSAL = [
    r"\bas an? (?:ai|artificial intelligence|language model|assistant)\b",
    r"\bI(?:'m| am) (?:just )?an? (?:ai|language model|virtual assistant|chatbot)\b",
    r"\bI (?:cannot|can't|can not|won't|am unable to|'m unable to|am not able to)"
    r" (?:help|assist|provide|comply|fulfil|fulfill|do that|answer)",
    r"\bI(?:'m| am) sorry,? but I (?:cannot|can't|won't)\b",
    r"\bI (?:don't|do not) have (?:personal )?(?:feelings|emotions|opinions|beliefs)\b",
    r"\b(?:trained|developed|created) by (?:hugging ?face|openai|google|anthropic|meta)\b",
]
_REFUSAL_RE = [re.compile(p, re.I) for p in _REFUSAL]


def refusal(text: str) -> float:
    """1.0 when the completion is refusal or assistant-identity boilerplate, else 0.0."""
    return 1.0 if any(r.search(text) for r in _REFUSAL_RE) else 0.0


# ---------------------------------------------------------------- model scores
def _batched_logprobs(model, tok, prompt_ids, completion_ids, batch_size, cache_prefix: bool = True):
    """Per row: log p(completion token | prompt, earlier completion tokens), under `model` as it stands.

    With `cache_prefix`, work shared between rows runs once (the numbers equal the uncached pass,
    tested): a long token prefix every prompt starts with (a system prompt, persona demonstrations, a
    template's default system block) runs at batch 1, and rows with the same whole prompt (a GRPO
    group's completions) share one pass over that prompt; only the completions run per row."""
    if not prompt_ids:
        return []
    Lp = shared_prefix_len(tok, prompt_ids) if cache_prefix else 0
    repeated = len({tuple(p) for p in prompt_ids}) < len(prompt_ids)
    if Lp >= MIN_PREFIX or (Lp > 0 and repeated):
        return _prefixed_logprobs(model, prompt_ids[0][:Lp], [p[Lp:] for p in prompt_ids], completion_ids,
                                  batch_size)
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        out += completion_logprobs(model, pack(prompt_ids[i:i + batch_size], completion_ids[i:i + batch_size],
                                               tok.pad_token_id))
    return out


MIN_PREFIX = 16  # shorter shared prefixes are not worth a cache (unless whole prompts repeat)


def shared_prefix_len(tok, rows: list[list[int]]) -> int:
    """Tokens every row starts with, cut back to just after the last special token in them (a turn
    boundary: tokenisation never merges across it), and always leaving each row one token of its own
    (the hidden state that predicts the first completion token)."""
    L = min(len(r) for r in rows) - 1
    n = 0
    while n < L and all(r[n] == rows[0][n] for r in rows):
        n += 1
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    while n > 0 and rows[0][n - 1] not in special:
        n -= 1
    return n


@torch.no_grad()
def _prefixed_logprobs(model, prefix: list[int], suffixes: list[list[int]], completions: list[list[int]],
                       batch_size: int) -> list[torch.Tensor]:
    lm = causal_lm(model)
    dec = lm.get_decoder()
    device = next(model.parameters()).device
    was = model.training
    model.eval()  # in train mode with gradient checkpointing (inside a GRPO step) HF turns the KV cache off
    try:
        return _prefixed_logprobs_eval(model, lm, dec, device, prefix, suffixes, completions, batch_size)
    finally:
        model.train(was)


def _sliding_window(model) -> bool:
    """Whether some layer attends within a window counted in cache slots (gemma-3, mistral): a masked
    hole in the middle of a row would shift that window, so such models get hole-free batches."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(cfg, "sliding_window", None) or getattr(cfg, "use_sliding_window", True) is False:
        return False
    types = getattr(cfg, "layer_types", None)
    return types is None or any("sliding" in t for t in types)


def _prefixed_logprobs_eval(model, lm, dec, device, prefix, suffixes, completions, batch_size):
    """The shared prefix runs once (batch 1). When whole prompts repeat, each distinct suffix but its
    last token runs once per group of rows ("head"), and per row only the suffix's last token and the
    completion run ("tail"); otherwise the tail is the whole suffix + completion. Padding sits at the
    right of each stage and is masked; positions count real tokens only. With a sliding-window model
    a batch holds only groups whose heads have one length, so no row has a masked hole."""
    Lp = len(prefix)
    pre = dec(input_ids=torch.tensor([prefix], device=device), position_ids=torch.arange(Lp, device=device)[None],
              use_cache=True).past_key_values
    chunk = auto_chunk(lm.get_output_embeddings().weight.shape[0])
    groups: dict[tuple, list[int]] = {}
    for i, sf in enumerate(suffixes):
        groups.setdefault(tuple(sf), []).append(i)
    use_heads = len(groups) < len(suffixes)
    same_len = use_heads and _sliding_window(model)
    keys = sorted(groups, key=len) if same_len else list(groups)
    out: list[torch.Tensor | None] = [None] * len(suffixes)
    k = 0
    while k < len(keys):  # whole groups per batch, up to batch_size rows (at least one group)
        batch = [keys[k]]
        n_rows = len(groups[keys[k]])
        k += 1
        while (k < len(keys) and n_rows + len(groups[keys[k]]) <= batch_size
               and not (same_len and len(keys[k]) != len(batch[0]))):
            n_rows += len(groups[keys[k]])
            batch.append(keys[k])
            k += 1
        rows = [i for g in batch for i in groups[g]]
        gi = torch.tensor([j for j, g in enumerate(batch) for _ in groups[g]], dtype=torch.long)
        heads = [list(g[:-1]) if use_heads else [] for g in batch]
        Sh = max(len(h) for h in heads)
        cache = copy.deepcopy(pre)
        cache.batch_repeat_interleave(len(batch))
        att_g = torch.zeros((len(batch), Lp + Sh), dtype=torch.long)
        att_g[:, :Lp] = 1
        if Sh:
            ids_g = torch.zeros((len(batch), Sh), dtype=torch.long)
            for j, h in enumerate(heads):
                ids_g[j, :len(h)] = torch.tensor(h, dtype=torch.long)
                att_g[j, Lp:Lp + len(h)] = 1
            dec(input_ids=ids_g.to(device), attention_mask=att_g.to(device),
                position_ids=(Lp + torch.arange(Sh))[None].expand(len(batch), Sh).to(device),
                past_key_values=cache, use_cache=True)
        cache.batch_select_indices(gi.to(device))  # each row gets its group's cache
        cmp = [completions[i] for i in rows]
        lead = [suffixes[i][len(heads[int(g)]):] for i, g in zip(rows, gi)]  # >= 1 token: predicts cmp[0]
        tails = [a + c for a, c in zip(lead, cmp)]
        St = max(len(t) for t in tails)
        ids = torch.zeros((len(rows), St), dtype=torch.long)
        att = torch.cat([att_g[gi], torch.zeros((len(rows), St), dtype=torch.long)], 1)
        for j, t in enumerate(tails):
            ids[j, :len(t)] = torch.tensor(t, dtype=torch.long)
            att[j, Lp + Sh:Lp + Sh + len(t)] = 1
        start = torch.tensor([Lp + len(heads[int(g)]) for g in gi])
        pos = start[:, None] + torch.arange(St)[None]
        h = dec(input_ids=ids.to(device), attention_mask=att.to(device), position_ids=pos.to(device),
                past_key_values=cache, use_cache=True).last_hidden_state
        # tail position len(lead) - 1 + t predicts completion token t
        b = torch.tensor([j for j, c in enumerate(cmp) for _ in c], dtype=torch.long)
        t = torch.tensor([len(a) - 1 + x for a, c in zip(lead, cmp) for x in range(len(c))], dtype=torch.long)
        tgt = torch.tensor([x for c in cmp for x in c], dtype=torch.long, device=device)
        lp = torch.empty(len(b), dtype=torch.float32, device=device)
        for c0 in range(0, len(b), chunk):
            logits = lm_logits(model, h[b[c0:c0 + chunk].to(device), t[c0:c0 + chunk].to(device)])
            lp[c0:c0 + chunk] = torch.log_softmax(logits, -1).gather(-1, tgt[c0:c0 + chunk, None])[:, 0]
        for i, x in zip(rows, torch.split(lp, [len(c) for c in cmp])):
            out[i] = x.cpu()
    return out


def tail_mean(lp: torch.Tensor, frac: float = 0.25) -> float:
    """Mean NLL of the last `frac` of tokens (at least one); steering collapses late."""
    if len(lp) == 0:
        return float("inf")
    k = max(1, int(round(len(lp) * frac)))
    return float(-lp[-k:].mean())


def tail_nll(model, tok, prompt_ids, completion_ids, frac: float = 0.25, batch_size: int = 32,
             cache_prefix: bool = True) -> list[float]:
    """Tail NLL of each completion under `model` as it stands (caller sets the reference context)."""
    return nll_stats(model, tok, prompt_ids, completion_ids, frac, batch_size, cache_prefix)[0]


def nll_stats(model, tok, prompt_ids, completion_ids, frac: float = 0.25, batch_size: int = 32,
              cache_prefix: bool = True) -> tuple[list[float], list[float]]:
    """(tail NLL, whole-completion mean NLL) of each completion, from one pass (inf for empty)."""
    nonempty = [i for i, c in enumerate(completion_ids) if c]
    lps = _batched_logprobs(model, tok, [prompt_ids[i] for i in nonempty], [completion_ids[i] for i in nonempty],
                            batch_size, cache_prefix)
    tail, mean = [float("inf")] * len(completion_ids), [float("inf")] * len(completion_ids)
    for i, lp in zip(nonempty, lps):
        tail[i], mean[i] = tail_mean(lp, frac), float(-lp.mean())
    return tail, mean


def persona_logprobs(model, tok, users: list[str], completion_ids, persona_pos: str, persona_neg: str,
                     batch_size: int = 32, demos: list[dict] = (), cache_prefix: bool = True):
    """Per completion: log p(y_t | persona context, x, y<t) under the positive and the negative
    persona's context (empty completions give empty tensors). Each side's context is its persona
    as the system prompt plus, with `demos` ([{user, pos, neg}]), earlier turns in which that persona
    acts: small reference models condition on shown behaviour far more than on a one-line
    description. The context is the same for every row, so it runs once per call and its KV cache
    serves the batch (`cache_prefix`)."""
    keep = [i for i, c in enumerate(completion_ids) if c]
    comp = [completion_ids[i] for i in keep]
    hist = {side: [(d["user"], d[side]) for d in demos] for side in ("pos", "neg")}
    pos = [encode_prompt(tok, render_prompt(tok, users[i], system=persona_pos, history=hist["pos"])) for i in keep]
    neg = [encode_prompt(tok, render_prompt(tok, users[i], system=persona_neg, history=hist["neg"])) for i in keep]
    lp_pos = _batched_logprobs(model, tok, pos, comp, batch_size, cache_prefix)
    lp_neg = _batched_logprobs(model, tok, neg, comp, batch_size, cache_prefix)
    empty = torch.zeros(0)
    out_pos, out_neg = [empty] * len(completion_ids), [empty] * len(completion_ids)
    for i, a, b in zip(keep, lp_pos, lp_neg):
        out_pos[i], out_neg[i] = a, b
    return out_pos, out_neg


def persona_llr(model, tok, users: list[str], completion_ids, persona_pos: str, persona_neg: str,
                batch_size: int = 32, demos: list[dict] = (), cache_prefix: bool = True) -> list[float]:
    """mean_t [log p(y_t | pos, x, y<t) - log p(y_t | neg, x, y<t)], nats/token (0 for empty)."""
    lp_pos, lp_neg = persona_logprobs(model, tok, users, completion_ids, persona_pos, persona_neg, batch_size, demos,
                                      cache_prefix)
    return llr_from(lp_pos, lp_neg)


def llr_from(lp_pos, lp_neg) -> list[float]:
    return [float((a - b).mean()) if len(a) else 0.0 for a, b in zip(lp_pos, lp_neg)]
