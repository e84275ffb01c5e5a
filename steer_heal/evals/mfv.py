"""Moral-foundations forced-choice evaluation: tinymfv's numbers (wassname/tinymfv @ 01e9026,
src/moralmaps/eval.py + guided.py), batched.

Per vignette and frame (forward / reversed option order):
  1. user turn = vignette + JSON-schema block of the 7 options as digits; chat template with the
     generation prompt, plus "<think>\\n" unless the template already opened one;
  2. greedy-generate exactly T think tokens, EOS (and a single-token "</think>") suppressed;
  3. answer: "</think>" + the template's assistant-close + the "Just answer" turn rendered as a
     fresh conversation (so a template's default system block comes before it) + the prefill;
     log-softmax at the last position, gathered at the 7 digit tokens; prefill NLL = mean over
     the prefill tokens. A think trace that already contains the prefill ("natural emission") or
     that closed its own think block is handled as tinymfv handles it (see `read`).

`read="tinymfv"` (default, for comparability) keeps three details of tinymfv's answer pass that
look like accidents: (a) the last think token never enters the answer context (generate's KV
cache ends before it); (b) prompt/think tokens equal to the pad id (often the template's turn-end
token) are masked out of attention; (c) a natural emission is unscorable (tinymfv reads
generate's processed scores, whose suppressed -inf entries fail its finiteness check).
`read="exact"` feeds every think token, attends to every real token and reads a natural
emission off the trace. Both run on left-padded batches with position ids from the real
attention mask, so a row's numbers do not depend on what else is in its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from steer_heal.chat import encode_prompt
from steer_heal.engine.base import Sampling
from steer_heal.engine.hf import HFEngine
from steer_heal.evals import protocol as P
from steer_heal.evals.mfv_data import human_label, human_profile, is_labelled
from steer_heal.logprobs import final_hidden, left_pad, lm_logits
from steer_heal.models import causal_lm
from steer_heal.steering.core import Steering
from steer_heal.steering.hooks import steer


class DigitTokenError(ValueError):
    """The tokenizer splits a digit into several tokens: the forced choice cannot be read."""


def digit_token_ids(tok) -> list[int]:
    ids = []
    for d in range(7):
        t = tok.encode(str(d), add_special_tokens=False)
        if len(t) != 1:
            raise DigitTokenError(f"the tokenizer encodes digit '{d}' as {len(t)} tokens {t}; the forced-choice "
                                  "protocol reads one token per option; fix: evaluate a model whose tokenizer has "
                                  "single-token digits 0-6")
        ids.append(t[0])
    return ids


def think_prompt(tok, vignette: str, frame: int, system: str | None = None) -> str:
    """Step 1: the chat prompt ending in an open think block (`system`: the persona-prompt baseline)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": P.user_turn(vignette, frame)}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return text if text.rstrip().endswith("<think>") else text + P.OPEN_THINK


SENTINEL = "ZZUNIQ_ASSISTANT_SENTINEL_ZZ"  # tinymfv's; any string the template passes through works


def answer_suffix(tok) -> str:
    """Step 3's fixed text between the think tokens and the prefill, as tinymfv derives it: the
    assistant-turn close, then the nudge rendered as a fresh conversation up to its assistant turn."""
    closed = tok.apply_chat_template([{"role": "user", "content": "_"}, {"role": "assistant", "content": SENTINEL}],
                                     tokenize=False)
    interrupt = tok.apply_chat_template([{"role": "user", "content": P.NUDGE},
                                         {"role": "assistant", "content": SENTINEL}],
                                        tokenize=False, continue_final_message=True)
    return P.CLOSE_THINK + closed.split(SENTINEL, 1)[1] + interrupt.split(SENTINEL, 1)[0]


def think_end_id(tok) -> int:
    """The single token that closes a think block, or EOS when the vocabulary has none (tinymfv's rule)."""
    t = tok.convert_tokens_to_ids(P.CLOSE_THINK)
    return tok.eos_token_id if t is None or t == getattr(tok, "unk_token_id", None) else t


def natural_window(tok, think_ids: list[int], text: str) -> tuple[int, int] | None:
    """(start, answer): think_ids[start:answer] decode to `text` and think_ids[answer] is the token
    after it; None when `text` is absent or nothing follows it (tinymfv's incremental decode)."""
    full = tok.decode(think_ids, skip_special_tokens=False)
    i = full.find(text)
    if i < 0:
        return None
    start = end = None
    for t in range(len(think_ids)):
        n = len(tok.decode(think_ids[:t + 1], skip_special_tokens=False))
        if start is None and n > i:
            start = t
        if n >= i + len(text):
            end = t + 1
            break
    if start is None or end is None or end >= len(think_ids):
        return None
    return start, end


@dataclass
class MFVResult:
    rows: list[dict]
    profile: list[float]
    human_profile: list[float]
    pmass_allowed: float
    frac_unscorable: float
    nll_prefill: float
    top1_acc: float
    informedness: float
    think_tokens: int
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_summary(cls, d: dict) -> "MFVResult":
        """Rebuild the aggregates (no rows) from a saved summary, e.g. the base on resume."""
        return cls(rows=[], profile=d["profile"], human_profile=d.get("human_profile", []),
                   pmass_allowed=d["pmass_allowed"], frac_unscorable=d["frac_unscorable"],
                   nll_prefill=d["nll_prefill"], top1_acc=d["top1_acc"], informedness=d["informedness"],
                   think_tokens=d.get("think_tokens", 0))

    @property
    def nats(self) -> list[float]:
        return [math.log(max(p, 1e-12)) for p in self.profile]

    def foundation(self, name: str) -> float:
        return self.profile[P.FOUNDATIONS.index(name)]

    def summary(self) -> dict:
        d = {f"p_{f}": p for f, p in zip(P.FOUNDATIONS, self.profile)}
        d.update({f"nats_{f}": n for f, n in zip(P.FOUNDATIONS, self.nats)})
        d.update(pmass_allowed=self.pmass_allowed, frac_unscorable=self.frac_unscorable, nll_prefill=self.nll_prefill,
                 top1_acc=self.top1_acc, informedness=self.informedness, n=len(self.rows),
                 profile=self.profile, human_profile=self.human_profile, think_tokens=self.think_tokens)
        return d


def row_math(lp_fwd: list[float], lp_rev: list[float]) -> dict:
    """Scores from the 7 digit log-probs of each frame. Reversed: digit k means foundation 6 - k.
    A frame that could not be read (NaN) makes the row unscorable: p and pmass are NaN."""
    if not all(math.isfinite(x) for x in list(lp_fwd) + list(lp_rev)):
        nan = float("nan")
        return dict(score=[nan] * 7, p=[nan] * 7, top1=-1, margin=nan, pmass_allowed=nan)
    score = [(lp_fwd[f] + lp_rev[6 - f]) / 2 for f in range(7)]
    m = max(score)
    e = [math.exp(s - m) for s in score]
    p = [x / sum(e) for x in e]
    order = sorted(range(7), key=lambda i: -score[i])
    pmass = (sum(math.exp(x) for x in lp_fwd) + sum(math.exp(x) for x in lp_rev)) / 2
    return dict(score=score, p=p, top1=order[0], margin=score[order[0]] - score[order[1]], pmass_allowed=pmass)


def informedness(pred: list[int], gold: list[int]) -> float:
    """Macro Youden J over the classes present in `gold`: mean_c (TPR_c - FPR_c)."""
    js = []
    for c in sorted(set(gold)):
        pos = [p for p, g in zip(pred, gold) if g == c]
        neg = [p for p, g in zip(pred, gold) if g != c]
        tpr = sum(p == c for p in pos) / len(pos)
        fpr = sum(p == c for p in neg) / len(neg) if neg else 0.0
        js.append(tpr - fpr)
    return sum(js) / max(len(js), 1)


READS = ("tinymfv", "exact")


@torch.no_grad()
def _answer_logprobs(model, h: torch.Tensor, ids: torch.Tensor, n_prefill: int, digit_ids: list[int]):
    """From final hidden states of the answer tokens: 7 digit log-probs at the last position, prefill NLL."""
    lp = torch.log_softmax(lm_logits(model, h[:, -1 - n_prefill:]), -1)
    tgt = ids[:, -n_prefill:]
    nll = -lp[:, :-1].gather(-1, tgt[..., None])[..., 0].mean(-1)
    return lp[:, -1, digit_ids].cpu(), nll.cpu()


@torch.no_grad()
def _answer_full(model, tok, seqs: list[list[int]], n_prefill: int, digit_ids: list[int], n_tail: int | None = None,
                 read: str = "exact"):
    """No KV cache: one left-padded forward over prompt (+ think) + suffix + prefill. With
    read="tinymfv", tokens equal to the pad id before the last `n_tail` are not attended."""
    device = next(model.parameters()).device
    ids, att = (x.to(device) for x in left_pad(seqs, tok.pad_token_id))
    if read == "tinymfv" and n_tail:
        quirk = att.clone()
        quirk[:, :-n_tail] &= (ids[:, :-n_tail] != tok.pad_token_id).long()
        h = _decoder(model, ids, quirk, (att.cumsum(-1) - 1).clamp_min(0))
    else:
        h = final_hidden(model, ids, att)
    return _answer_logprobs(model, h, ids, n_prefill, digit_ids)


def _decoder(model, ids, att, pos, cache=None):
    out = causal_lm(model).get_decoder()(input_ids=ids, attention_mask=att, position_ids=pos, past_key_values=cache,
                                         use_cache=cache is not None)
    return out.last_hidden_state


@torch.no_grad()
def _answer_cached(model, cache, real: torch.Tensor, attend: torch.Tensor, tail: torch.Tensor, n_prefill: int,
                   digit_ids: list[int]):
    """Continue from the think phase's KV cache (its `real` / `attend` masks cover the cached tokens)."""
    ones = torch.ones((real.shape[0], tail.shape[1]), dtype=real.dtype, device=real.device)
    full_real, full_att = torch.cat([real, ones], 1), torch.cat([attend, ones], 1)
    pos = (full_real.cumsum(-1) - 1)[:, -tail.shape[1]:]
    h = _decoder(model, tail, full_att, pos, cache)
    return _answer_logprobs(model, h, tail, n_prefill, digit_ids)


@torch.no_grad()
def _natural_read(model, prompt: list[int], think: list[int], win: tuple[int, int], suppressed: list[int],
                  digit_ids: list[int]):
    """The answer read off the think trace (read="exact"): the logits that produced think[answer],
    with the think phase's suppressed tokens at -inf as generate's processed scores have them.
    (tinymfv reads the same processed scores but rejects them as non-finite, because of those
    -inf entries, so under read="tinymfv" a natural emission is an unscorable row.)"""
    start, ans = win
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + think[:ans]], device=device)
    h = final_hidden(model, ids, torch.ones_like(ids))[0]
    P0 = len(prompt)
    logits = lm_logits(model, h[P0 - 1 + start:P0 + ans])  # rows k = start..ans predict think[k]
    logits[:, suppressed] = float("-inf")
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        return [float("nan")] * 7, float("nan")
    lp = torch.log_softmax(logits, -1)
    nll = -sum(float(lp[k, think[start + k]]) for k in range(ans - start)) / max(1, ans - start)
    return lp[-1, digit_ids].cpu().tolist(), nll


def evaluate_mfv(model, tok, rows: list[dict], think_tokens: int = 64, batch_size: int = 16,
                 steering: Steering | None = None, min_pmass: float = 0.0, progress: bool = True,
                 read: str = "tinymfv", system: str | None = None) -> MFVResult:
    """Run the forced-choice protocol on `rows` (see mfv_data.load_vignettes) under optional steering.

    `min_pmass` > 0 also counts rows whose digit mass is under it as unscorable (tinymfv counts only
    rows it could not read); `read` see the module docstring."""
    if read not in READS:
        raise ValueError(f"unknown MFV read '{read}'; fix: use one of {READS}")
    was_training = model.training
    model.eval()  # train mode + gradient checkpointing would switch the KV cache off
    try:
        return _evaluate(model, tok, rows, think_tokens, batch_size, steering, min_pmass, progress, read, system)
    finally:
        model.train(was_training)


def _evaluate(model, tok, rows, think_tokens, batch_size, steering, min_pmass, progress, read, system) -> MFVResult:
    digit_ids = digit_token_ids(tok)
    device = next(model.parameters()).device
    pad = tok.pad_token_id
    items = [(i, f) for i in range(len(rows)) for f in (0, 1)]
    prompt_ids = [encode_prompt(tok, think_prompt(tok, rows[i]["text"], f, system)) for i, f in items]
    suffix = tok.encode(answer_suffix(tok), add_special_tokens=False)
    prefill = tok.encode(P.PREFILL, add_special_tokens=False)
    close_id = think_end_id(tok)
    # step 2: exactly T greedy think tokens; min_new_tokens holds EOS off, "</think>" is suppressed too
    samp = Sampling(max_new_tokens=think_tokens, min_new_tokens=think_tokens, temperature=0.0,
                    banned=[[close_id]] if close_id != tok.eos_token_id else [])
    eng = HFEngine(model, tok, batch_size=batch_size)
    suppressed = sorted(set(eng.eos_ids) | {close_id})
    # longest vignettes first, a vignette's two frames side by side: they share its text's prefill
    order = sorted(range(len(items)), key=lambda i: (-len(prompt_ids[i - i % 2]), i))
    think: list = [None] * len(items)
    out_d: list = [None] * len(items)
    out_n: list = [None] * len(items)
    for j in tqdm(range(0, len(order), batch_size), desc="mfv", disable=not progress, leave=False):
        idx = order[j:j + batch_size]
        if think_tokens > 0:
            comps, _, cache, att, inp = eng.generate_batch(
                [prompt_ids[i] for i in idx], steering, samp, return_cache=True, share_prefix=True
            )
            n = cache.get_seq_length()  # prompt + think minus the last think token (sampled, never fed)
            think_t = torch.tensor(comps, device=device)
            real = torch.cat([att, torch.ones_like(think_t, dtype=att.dtype)], 1)[:, :n]
            if read == "tinymfv":  # the last think token stays out; pad-id tokens are not attended
                ids_pt = torch.cat([inp, think_t], 1)[:, :n]
                attend = real * (ids_pt != pad).long()
                tail = torch.tensor([suffix + prefill for _ in comps], device=device)
            else:  # feed the last think token, attend to every real token
                attend = real
                tail = torch.tensor([c[-1:] + suffix + prefill for c in comps], device=device)
            with steer(model, steering):
                d, nll = _answer_cached(model, cache, real, attend, tail, len(prefill), digit_ids)
            d, nll = d.tolist(), nll.tolist()
            for k, i in enumerate(idx):  # natural emission / self-closed traces (tinymfv's cases a and c)
                win = natural_window(tok, comps[k], P.PREFILL)
                if win is not None and read == "exact":
                    with steer(model, steering):
                        d[k], nll[k] = _natural_read(model, prompt_ids[i], comps[k], win, suppressed, digit_ids)
                elif win is not None or close_id in comps[k]:
                    d[k], nll[k] = [float("nan")] * 7, float("nan")
        else:
            comps = [[] for _ in idx]
            with steer(model, steering):
                d, nll = _answer_full(model, tok, [prompt_ids[i] + suffix + prefill for i in idx], len(prefill),
                                      digit_ids, len(suffix) + len(prefill), read)
            d, nll = d.tolist(), nll.tolist()
        for k, i in enumerate(idx):
            think[i], out_d[i], out_n[i] = comps[k], [float(x) for x in d[k]], float(nll[k])
    per: dict[int, dict] = {}
    for (i, f), d, n, t in zip(items, out_d, out_n, think):
        per.setdefault(i, {})[f] = (d, n, t)
    res_rows = []
    for i, r in enumerate(rows):
        (df, nf, tf), (dr, nr, tr) = per[i][0], per[i][1]
        m = row_math(df, dr)
        g = human_label(r)
        pm = m["pmass_allowed"]
        res_rows.append(dict(id=r.get("id"), foundation=r["foundation_coarse"], human_label=P.FOUNDATIONS[g],
                             **m, top1_name=P.FOUNDATIONS[m["top1"]] if m["top1"] >= 0 else "",
                             nll_prefill=(nf + nr) / 2, unscorable=not math.isfinite(pm) or pm < min_pmass,
                             logp_fwd=df, logp_rev=dr, think_fwd=tok.decode(tf), think_rev=tok.decode(tr),
                             think_ids_fwd=tf, think_ids_rev=tr))
    return aggregate_rows(res_rows, rows, think_tokens)


def nanmean(xs) -> float:
    """Mean of the finite values (NaN when there are none)."""
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def aggregate_rows(res_rows: list[dict], rows: list[dict], think_tokens: int) -> MFVResult:
    """tinymfv's aggregation: profile and accuracy over scorable labelled rows; pmass and prefill
    NLL as NaN-skipping means; frac_unscorable = share of rows flagged unscorable."""
    ok = [(x, human_label(r)) for x, r in zip(res_rows, rows) if x["top1"] >= 0 and is_labelled(r)]
    n = max(len(ok), 1)
    profile = [sum(x["p"][f] for x, _ in ok) / n for f in range(7)]
    pred, gold = [x["top1"] for x, _ in ok], [g for _, g in ok]
    return MFVResult(rows=res_rows, profile=profile, human_profile=human_profile(rows),
                     pmass_allowed=nanmean(x["pmass_allowed"] for x in res_rows),
                     frac_unscorable=sum(x["unscorable"] for x in res_rows) / max(len(res_rows), 1),
                     nll_prefill=nanmean(x["nll_prefill"] for x in res_rows),
                     top1_acc=sum(p == g for p, g in zip(pred, gold)) / n, informedness=informedness(pred, gold),
                     think_tokens=think_tokens)


def trait_nats(res: MFVResult, axis: dict[str, int]) -> float:
    """Signed mean of log profile over the preset's target foundations (higher = more trait); NaN for a trait
    with no foundations (no axis to read)."""
    if not axis:
        return float("nan")
    return sum(s * res.nats[P.FOUNDATIONS.index(f)] for f, s in axis.items()) / max(len(axis), 1)


def surgicality(res: MFVResult, base: MFVResult, axis: dict[str, int]) -> dict:
    """Target foundations move (in their intended direction) more than the largest off-target one."""
    d = [a - b for a, b in zip(res.nats, base.nats)]
    target = sum(s * d[P.FOUNDATIONS.index(f)] for f, s in axis.items()) / max(len(axis), 1)
    off = max((abs(d[i]) for i, f in enumerate(P.FOUNDATIONS) if f not in axis), default=0.0)
    return dict(target_shift=target, offtarget_max=off, surgical=target > off)


def mfv_columns(res: MFVResult | None, base: MFVResult | None, axis: dict, suffix: str = "") -> dict:
    """The evaluation's columns for a round or bake row: trait_nats, coherence, and vs-base changes."""
    if res is None:
        return {}
    out = {f"pmass{suffix}": res.pmass_allowed, f"nll_prefill{suffix}": res.nll_prefill,
           f"unscorable{suffix}": res.frac_unscorable, f"profile{suffix}": res.profile}
    if not axis:  # a trait with no moral-foundations axis: no MFV trait column (the coherence columns stay)
        return out
    out = {f"trait_nats{suffix}": trait_nats(res, axis)} | out
    if base is not None:
        out[f"d_trait_nats{suffix}"] = out[f"trait_nats{suffix}"] - trait_nats(base, axis)
        out.update({f"{k}{suffix}": v for k, v in surgicality(res, base, axis).items()})
    return out


def format_profile(res: MFVResult, base: MFVResult | None = None) -> str:
    head = f"{'foundation':<12} {'model p':>8} {'nats':>7} {'human p':>8}" + (
        f" {'base p':>8} {'d nats':>7}" if base else ""
    )
    lines = [head]
    for i, f in enumerate(P.FOUNDATIONS):
        ln = f"{f:<12} {res.profile[i]:>8.3f} {res.nats[i]:>7.2f} {res.human_profile[i]:>8.3f}"
        if base:
            ln += f" {base.profile[i]:>8.3f} {res.nats[i] - base.nats[i]:>+7.2f}"
        lines.append(ln)
    lines.append(f"pmass_allowed {res.pmass_allowed:.3f}  frac_unscorable {res.frac_unscorable:.3f}  "
                 f"nll_prefill {res.nll_prefill:.3f}  top1_acc {res.top1_acc:.3f}  informedness {res.informedness:+.3f}"
                 f"  (n={len(res.rows)}, T={res.think_tokens})")
    return "\n".join(lines)
