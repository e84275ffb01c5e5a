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
from steer_heal.kvcache import prefix_pass, sliding_window, stack_caches
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
def _tail_len(n: int, frac: float) -> int:
    """Tokens in the tail of an n-token completion (at least one)."""
    return max(1, int(round(n * frac)))


def context_logprobs(model, tok, contexts: list[list[list[int]]], completion_ids, batch_size: int = 32,
                     cache_prefix: bool = True, tail_frac: list[float | None] | None = None,
                     store: "PrefixStore | None" = None) -> list[list[torch.Tensor]]:
    """Per context (one prompt per row), per row: log p(completion token | that prompt, earlier completion
    tokens) under `model` as it stands (empty completions give empty tensors).

    With `cache_prefix` the work shared between rows runs once (the numbers equal the uncached pass,
    tested): each context's long common prefix (a system prompt, persona demonstrations) at batch 1,
    each distinct prompt's rest once per group of rows with that prompt (a GRPO group), and only the
    completions per row; the contexts' passes are merged into one batched forward per stage (bigger
    matrix products), except for sliding-window models, whose rows must not hold masked holes.
    `tail_frac[k]` (None = every token): context k scores only each completion's last
    max(1, round(n * frac)) tokens (all a tail NLL reads), skipping the rest's vocabulary projection.
    `store` keeps the prefixes' KV across calls (`PrefixStore`)."""
    fracs = list(tail_frac or [None] * len(contexts))
    keep = [i for i, c in enumerate(completion_ids) if c]
    comps = [completion_ids[i] for i in keep]
    rows = [[ctx[i] for i in keep] for ctx in contexts]
    skips = [[0 if f is None else len(c) - _tail_len(len(c), f) for c in comps] for f in fracs]
    lps = _logprobs(model, tok, rows, comps, skips, batch_size, cache_prefix, store) if comps else [[]] * len(contexts)
    out = []
    for per_ctx in lps:
        full = [torch.zeros(0)] * len(completion_ids)
        for i, lp in zip(keep, per_ctx):
            full[i] = lp
        out.append(full)
    return out


def _cacheable(tok, prompt_ids) -> int:
    """Length of the prefix worth caching (0: none): long enough, or short but whole prompts repeat."""
    Lp = shared_prefix_len(tok, prompt_ids)
    repeated = len({tuple(p) for p in prompt_ids}) < len(prompt_ids)
    return Lp if Lp >= MIN_PREFIX or (Lp > 0 and repeated) else 0


def _logprobs(model, tok, contexts, comps, skips, batch_size, cache_prefix, store=None):
    Lps = [_cacheable(tok, ctx) for ctx in contexts] if cache_prefix else [0] * len(contexts)
    if all(Lps) and (len(contexts) == 1 or not sliding_window(model)):
        jobs = [(k, p[Lp:], c, s) for k, (ctx, Lp, sk) in enumerate(zip(contexts, Lps, skips))
                for p, c, s in zip(ctx, comps, sk)]
        flat = _prefixed_logprobs(model, [ctx[0][:Lp] for ctx, Lp in zip(contexts, Lps)], jobs, batch_size, store)
        return [flat[k * len(comps):(k + 1) * len(comps)] for k in range(len(contexts))]
    out = []
    for ctx, Lp, sk in zip(contexts, Lps, skips):
        if Lp:  # this context alone through the cache (another's prefix is not worth one, or no merging)
            out += _logprobs(model, tok, [ctx], comps, [sk], batch_size, True, store)
            continue
        lps = []
        for i in range(0, len(ctx), batch_size):
            lps += completion_logprobs(model, pack(ctx[i:i + batch_size], comps[i:i + batch_size], tok.pad_token_id))
        out.append([lp[s:] for lp, s in zip(lps, sk)])
    return out


def _batched_logprobs(model, tok, prompt_ids, completion_ids, batch_size, cache_prefix: bool = True):
    """One context's per-row completion log-probs (`context_logprobs` with a single context)."""
    if not prompt_ids:
        return []
    return context_logprobs(model, tok, [prompt_ids], completion_ids, batch_size, cache_prefix)[0]


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
def _prefixed_logprobs(model, prefixes: list[list[int]], jobs: list[tuple], batch_size: int,
                       store: "PrefixStore | None" = None) -> list[torch.Tensor]:
    lm = causal_lm(model)
    dec = lm.get_decoder()
    device = next(model.parameters()).device
    was = model.training
    model.eval()  # in train mode with gradient checkpointing (inside a GRPO step) HF turns the KV cache off
    try:
        return _prefixed_logprobs_eval(model, lm, dec, device, prefixes, jobs, batch_size, store)
    finally:
        model.train(was)


class PrefixStore:
    """Prefix KV caches kept across scoring calls: a run's persona contexts and system block are the
    same at every step, and the reference weights change only at a bake. Each reuse is checked
    first: the first `probe` tokens run again and their keys and values, at every layer, must equal
    bit for bit those stored with the cache, else the prefix is recomputed. A bake, an adapter or a
    steering hook changes whole weight matrices or every position's activations, so it moves the
    probe's keys and values whenever it moves the prefix's. Tested against the uncached pass across
    a weight change."""

    def __init__(self, probe: int = 8, size: int = 8):
        self.probe, self.size = probe, size
        self._kv: dict[tuple, tuple] = {}
        self.hits = self.misses = 0

    @staticmethod
    def _tensors(cache) -> list[torch.Tensor]:
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]

    def kv(self, dec, ids: list[int], device):
        key = tuple(ids)
        probe = self._tensors(prefix_pass(dec, ids[:self.probe], device)) if len(ids) > self.probe else None
        hit = self._kv.get(key)
        if hit is not None and probe is not None and all(torch.equal(a, b) for a, b in zip(probe, hit[0])):
            self.hits += 1
            return hit[1]
        self.misses += 1
        cache = prefix_pass(dec, ids, device)
        if probe is not None:  # a prefix no longer than the probe is recomputed every time
            if len(self._kv) >= self.size:
                self._kv.pop(next(iter(self._kv)))
            self._kv[key] = (probe, cache)
        return cache


def _prefixed_logprobs_eval(model, lm, dec, device, prefixes, jobs, batch_size, store=None):
    """`jobs`: (prefix index, suffix, completion, tokens to skip) per row. Each prefix runs once (batch
    1). When whole prompts repeat, each distinct (prefix, suffix) but the suffix's last token runs once
    per group of rows ("head"), and per row only the suffix's last token and the completion run
    ("tail"); otherwise the tail is the whole suffix + completion. Padding sits at the right of each
    stage and is masked; positions count real tokens only. With a sliding-window model (one prefix
    only) a batch holds only groups whose heads have one length, so no row has a masked hole."""
    pres = [store.kv(dec, p, device) if store is not None else prefix_pass(dec, p, device) for p in prefixes]
    pre, pmask = stack_caches(pres, [len(p) for p in prefixes])
    plen = torch.tensor([len(p) for p in prefixes])
    Lp = pmask.shape[1]
    chunk = auto_chunk(lm.get_output_embeddings().weight.shape[0])
    groups: dict[tuple, list[int]] = {}
    for i, (j, sf, _, _) in enumerate(jobs):
        groups.setdefault((j, tuple(sf)), []).append(i)
    use_heads = len(groups) < len(jobs)
    same_len = use_heads and sliding_window(model)
    keys = sorted(groups, key=lambda g: len(g[1])) if same_len else list(groups)
    out: list[torch.Tensor | None] = [None] * len(jobs)
    k = 0
    while k < len(keys):  # whole groups per batch, up to batch_size rows (at least one group)
        batch = [keys[k]]
        n_rows = len(groups[keys[k]])
        k += 1
        while (k < len(keys) and n_rows + len(groups[keys[k]]) <= batch_size
               and not (same_len and len(keys[k][1]) != len(batch[0][1]))):
            n_rows += len(groups[keys[k]])
            batch.append(keys[k])
            k += 1
        rows = [i for g in batch for i in groups[g]]
        gi = torch.tensor([n for n, g in enumerate(batch) for _ in groups[g]], dtype=torch.long)
        gj = torch.tensor([g[0] for g in batch], dtype=torch.long)
        heads = [list(g[1][:-1]) if use_heads else [] for g in batch]
        Sh = max(len(h) for h in heads)
        cache = copy.deepcopy(pre)
        cache.batch_select_indices(gj.to(device))  # each group gets its prefix's cache
        att_g = torch.cat([pmask[gj], torch.zeros((len(batch), Sh), dtype=torch.long)], 1)
        if Sh:
            ids_g = torch.zeros((len(batch), Sh), dtype=torch.long)
            for n, h in enumerate(heads):
                ids_g[n, :len(h)] = torch.tensor(h, dtype=torch.long)
                att_g[n, Lp:Lp + len(h)] = 1
            dec(input_ids=ids_g.to(device), attention_mask=att_g.to(device),
                position_ids=(plen[gj][:, None] + torch.arange(Sh)[None]).to(device),
                past_key_values=cache, use_cache=True)
        cache.batch_select_indices(gi.to(device))  # each row gets its group's cache
        cmp = [jobs[i][2] for i in rows]
        skip = [jobs[i][3] for i in rows]
        lead = [jobs[i][1][len(heads[int(g)]):] for i, g in zip(rows, gi)]  # >= 1 token: predicts cmp[0]
        tails = [a + c for a, c in zip(lead, cmp)]
        St = max(len(t) for t in tails)
        ids = torch.zeros((len(rows), St), dtype=torch.long)
        att = torch.cat([att_g[gi], torch.zeros((len(rows), St), dtype=torch.long)], 1)
        for n, t in enumerate(tails):
            ids[n, :len(t)] = torch.tensor(t, dtype=torch.long)
            att[n, Lp + Sh:Lp + Sh + len(t)] = 1
        start = plen[gj][gi] + torch.tensor([len(heads[int(g)]) for g in gi])
        pos = start[:, None] + torch.arange(St)[None]
        h = dec(input_ids=ids.to(device), attention_mask=att.to(device), position_ids=pos.to(device),
                past_key_values=cache, use_cache=True).last_hidden_state
        # tail position len(lead) - 1 + t predicts completion token t; tokens before `skip` are not scored
        b = torch.tensor([n for n, (c, s) in enumerate(zip(cmp, skip)) for _ in range(s, len(c))], dtype=torch.long)
        t = torch.tensor([len(a) - 1 + x for a, c, s in zip(lead, cmp, skip) for x in range(s, len(c))],
                         dtype=torch.long)
        tgt = torch.tensor([x for c, s in zip(cmp, skip) for x in c[s:]], dtype=torch.long, device=device)
        lp = torch.empty(len(b), dtype=torch.float32, device=device)
        for c0 in range(0, len(b), chunk):
            logits = lm_logits(model, h[b[c0:c0 + chunk].to(device), t[c0:c0 + chunk].to(device)])
            lp[c0:c0 + chunk] = torch.log_softmax(logits, -1).gather(-1, tgt[c0:c0 + chunk, None])[:, 0]
        for i, x in zip(rows, torch.split(lp, [len(c) - s for c, s in zip(cmp, skip)])):
            out[i] = x.cpu()
    return out


def tail_mean(lp: torch.Tensor, frac: float = 0.25) -> float:
    """Mean NLL of the last `frac` of tokens (at least one); steering collapses late."""
    if len(lp) == 0:
        return float("inf")
    return float(-lp[-_tail_len(len(lp), frac):].mean())


def tail_nll(model, tok, prompt_ids, completion_ids, frac: float = 0.25, batch_size: int = 32,
             cache_prefix: bool = True) -> list[float]:
    """Tail NLL of each completion under `model` as it stands (caller sets the reference context);
    only the tail's tokens are scored."""
    (lps,) = context_logprobs(model, tok, [prompt_ids], completion_ids, batch_size, cache_prefix, [frac])
    return [tail_mean(lp, 1.0) for lp in lps]


def nll_stats(model, tok, prompt_ids, completion_ids, frac: float = 0.25, batch_size: int = 32,
              cache_prefix: bool = True) -> tuple[list[float], list[float]]:
    """(tail NLL, whole-completion mean NLL) of each completion, from one pass (inf for empty)."""
    (lps,) = context_logprobs(model, tok, [prompt_ids], completion_ids, batch_size, cache_prefix)
    return [tail_mean(lp, frac) for lp in lps], [tail_mean(lp, 1.0) for lp in lps]


def persona_prompts(tok, users: list[str], persona_pos: str, persona_neg: str, demos: list[dict] = ()):
    """Each row's prompt under the positive and under the negative persona's context: the persona as
    the system prompt plus, with `demos` ([{user, pos, neg}]), earlier turns in which that persona
    acts (small reference models condition on shown behaviour far more than on a one-line
    description)."""
    hist = {side: [(d["user"], d[side]) for d in demos] for side in ("pos", "neg")}
    return ([encode_prompt(tok, render_prompt(tok, u, system=persona_pos, history=hist["pos"])) for u in users],
            [encode_prompt(tok, render_prompt(tok, u, system=persona_neg, history=hist["neg"])) for u in users])


def persona_logprobs(model, tok, users: list[str], completion_ids, persona_pos: str, persona_neg: str,
                     batch_size: int = 32, demos: list[dict] = (), cache_prefix: bool = True,
                     store: "PrefixStore | None" = None):
    """Per completion: log p(y_t | persona context, x, y<t) under the positive and the negative
    persona's context (`persona_prompts`; empty completions give empty tensors). Each context is
    the same for every row, so with `cache_prefix` it runs once per call and serves the batch
    (`store`: kept across calls)."""
    pos, neg = persona_prompts(tok, users, persona_pos, persona_neg, demos)
    lp_pos, lp_neg = context_logprobs(model, tok, [pos, neg], completion_ids, batch_size, cache_prefix, store=store)
    return lp_pos, lp_neg


def persona_llr(model, tok, users: list[str], completion_ids, persona_pos: str, persona_neg: str,
                batch_size: int = 32, demos: list[dict] = (), cache_prefix: bool = True) -> list[float]:
    """mean_t [log p(y_t | pos, x, y<t) - log p(y_t | neg, x, y<t)], nats/token (0 for empty)."""
    lp_pos, lp_neg = persona_logprobs(model, tok, users, completion_ids, persona_pos, persona_neg, batch_size, demos,
                                      cache_prefix)
    return llr_from(lp_pos, lp_neg)


def llr_from(lp_pos, lp_neg) -> list[float]:
    return [float((a - b).mean()) if len(a) else 0.0 for a, b in zip(lp_pos, lp_neg)]
