"""The reward components, computed once for both the iterative filter and the online GRPO reward.

    combined = w_trait * trait - w_verb * verbalisation - w_incoh * incoherence - w_refusal * refusal

Units: trait_llr in nats/token; trait_projection in vector lengths (+0.5 = the positive persona's
mean at the assistant tag, -0.5 = the negative's); verbalisation and refusal in [0, 1];
incoherence in nats: tail NLL under the reference plus `rep_nats` per unit of loopiness above
`rep_floor` (loopiness = max of the repetition score, duplicated word bigrams and stutters; a pure
loop adds ~rep_nats).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from reward import scores as S
from steer_heal.chat import encode_prompt, render_prompt
from steer_heal.engine.base import Sampling
from steer_heal.logprobs import pack
from steer_heal.models import causal_lm, decoder_layers
from steer_heal.setting import setting


@dataclass
class RewardConfig:
    """Scores, the iterative filter's thresholds and the online reward's weights (the `reward:`
    section of a run config; flat keys of the same names in an online config)."""
    max_tail_nll: float = setting(4.0, "filter: highest NLL (nats/token) of a reply's last tail_frac, under the "
                                       "reference", lo=0.0, lo_open=True)
    tail_frac: float = setting(0.25, "fraction of a reply's tokens that counts as its tail",
                               lo=0.0, hi=1.0, lo_open=True)
    max_repetition: float = setting(0.3, "filter: highest most-common n-gram fraction (word and char n = 2..4)",
                                    lo=0.0, hi=1.0)
    max_verbalisation: float = setting(0.5, "filter: highest verbalisation score (the reply names its persona)",
                                       lo=0.0, hi=1.0)
    max_refusal: float = setting(0.5, "filter: highest refusal score", lo=0.0, hi=1.0)
    min_tokens: int = setting(4, "filter: shortest reply kept, in tokens", lo=0)
    reward_trait: str = setting("llr", "trait measure in the reward: llr (persona log-likelihood ratio) | projection | "
                                  "judge (iterative only: needs a judge model)", choices=("llr", "projection", "judge"))
    w_trait: float = setting(1.0, "reward weight of the trait measure", lo=0.0)
    w_verb: float = setting(1.0, "reward weight of the verbalisation penalty", lo=0.0)
    w_incoh: float = setting(0.25, "reward weight of the incoherence penalty", lo=0.0)
    w_refusal: float = setting(1.0, "reward weight of the refusal penalty", lo=0.0)
    rep_nats: float = setting(10.0, "incoherence: nats added per unit of loopiness above rep_floor", lo=0.0)
    rep_floor: float = setting(0.1, "incoherence: loopiness below this costs nothing", lo=0.0, hi=1.0, hi_open=True)
    incoherence: str = setting("tail", "incoherence's NLL part: tail (tail NLL under the reference) | collapse "
                                       "(tail NLL minus the reply's mean NLL: late collapse only, a uniformly less "
                                       "predictable reply is not penalised)", choices=("tail", "collapse"))
    reward_ablation: str = setting("", "online: drop one reward component: trait_llr | trait_projection | "
                                       "verbalisation | incoherence | refusal",
                                       choices=("", "trait_llr", "trait_projection", "verbalisation", "incoherence",
                                                "refusal"))
    judge: bool = setting(False, "score the optional judge component (a chat model with a rubric)")


# the trait measure's name -> the component that carries it (the reward, its functions and the filter)
TRAIT_COMPONENT = {"llr": "trait_llr", "projection": "trait_projection", "judge": "judge"}


COMPONENTS = ("trait_llr", "trait_projection", "verbalisation", "incoherence", "refusal", "judge")


def preset_scorer(model, tok, preset, cfg: "RewardConfig | None" = None, **kw) -> "Scorer":
    """The Scorer for a preset: its persona pair and its persona demonstrations (the one way the
    loop's filter, the online reward and `steer-heal score` build it)."""
    return Scorer(model, tok, (preset.persona_pos, preset.persona_neg), cfg, demos=preset.persona_demos, **kw)


def heldout_scorer(model, tok, preset, **kw) -> "Scorer":
    """trait_llr under the preset's held-out pair and demonstrations (written for evaluation only,
    never the reward's context): how the comparison and the round rows judge the trait."""
    return Scorer(model, tok, (preset.eval_persona_pos, preset.eval_persona_neg), demos=preset.eval_persona_demos, **kw)


class Scorer:
    """Scores completions with the reference model (`ref_ctx()`: no steering, no live adapter).

    One instance serves the filter and the TRL reward functions, so both read the same numbers.
    """

    def __init__(self, model, tok, personas: tuple[str, str], cfg: RewardConfig | None = None,
                 ref_ctx=nullcontext, vector=None, batch_size: int = 64, judge_engine=None, demos: list[dict] = (),
                 cache_prefix: bool = True):
        self.model, self.tok, self.personas, self.demos = model, tok, personas, list(demos)
        self.cfg = cfg or RewardConfig()
        self.ref_ctx, self.vector, self.batch_size, self.judge_engine = ref_ctx, vector, batch_size, judge_engine
        self.cache_prefix = cache_prefix  # shared prompt prefixes (persona contexts) run once per batch
        self.prefixes = S.PrefixStore() if cache_prefix else None  # ... and their KV is kept across batches
        self._memo: tuple | None = None  # (batch key, components): TRL calls one function per component
        self.seconds = 0.0  # time spent scoring (for the step-time split)

    def prompt_ids(self, users: list[str]) -> list[list[int]]:
        return [encode_prompt(self.tok, render_prompt(self.tok, u)) for u in users]

    # ---------------------------------------------------------------- model components
    def persona_logprobs(self, users, completion_ids):
        with self.ref_ctx():
            return S.persona_logprobs(self.model, self.tok, users, completion_ids, *self.personas,
                                      batch_size=self.batch_size, demos=self.demos, cache_prefix=self.cache_prefix,
                                      store=self.prefixes)

    def trait_llr(self, users, completion_ids) -> list[float]:
        return S.llr_from(*self.persona_logprobs(users, completion_ids))

    def trait_projection(self, users, completion_ids, prompt_ids=None) -> list[float]:
        if self.vector is None:
            raise ValueError("trait_projection needs the current steering vector; fix: pass vector= to the Scorer")
        with self.ref_ctx():
            return projection(self.model, self.tok, prompt_ids or self.prompt_ids(users), completion_ids,
                              self.vector, self.batch_size)

    def judge(self, users, texts) -> list[float]:
        if self.judge_engine is None:
            raise ValueError("the judge is off; fix: set reward.judge=true and give the Scorer a judge_engine")
        return judge_scores(self.judge_engine, users, texts, self.personas[0])

    # ---------------------------------------------------------------- all at once
    def incoherence_from(self, tail: list[float], loop: list[float]) -> list[float]:
        c = self.cfg
        return [t + c.rep_nats * max(0.0, r - c.rep_floor) / (1 - c.rep_floor) for t, r in zip(tail, loop)]

    def components(self, users, completion_ids, texts, prompt_ids=None, which=None) -> dict[str, list[float]]:
        """Every requested component (default: all the config enables) for a batch of completions.

        Components already computed for the same batch are reused (TRL calls each reward function,
        and the dose controller, on the same batch)."""
        t0 = time.perf_counter()
        which = which or [k for k in COMPONENTS if (k != "trait_projection" or self.vector is not None)
                          and (k != "judge" or self.cfg.judge)]
        key = (tuple(users), tuple(tuple(c) for c in completion_ids))
        memo = self._memo[1] if self._memo is not None and self._memo[0] == key else {}
        out = self._compute(users, completion_ids, texts, prompt_ids, [w for w in which if w not in memo], memo)
        self._memo = (key, out)
        self.seconds += time.perf_counter() - t0
        return out

    def _compute(self, users, completion_ids, texts, prompt_ids, which, memo) -> dict[str, list[float]]:
        out: dict[str, list[float]] = dict(memo)
        rep = [S.repetition(t) for t in texts]
        out["repetition"] = rep
        out["n_tokens"] = [len(c) for c in completion_ids]
        want_ctx = "incoh_ctx" in which
        want_nll = "incoherence" in which or "tail_nll" in which or want_ctx
        want_llr = "trait_llr" in which
        want_persona = want_llr or want_ctx
        # the reference context(s) and the two persona contexts in one merged pass; in tail mode the plain
        # context scores only each reply's tail (all the tail NLL reads)
        ctx, fracs = [], []
        if want_nll:
            ctx.append(prompt_ids or self.prompt_ids(users))
            fracs.append(self.cfg.tail_frac if self.cfg.incoherence == "tail" else None)
        if want_persona:  # the llr reads whole replies; incoh_ctx alone, only their tails
            ctx += S.persona_prompts(self.tok, users, *self.personas, self.demos)
            fracs += [None, None] if want_llr else [self.cfg.tail_frac] * 2
        if ctx:
            with self.ref_ctx():
                lps = S.context_logprobs(self.model, self.tok, ctx, completion_ids, self.batch_size,
                                         self.cache_prefix, fracs, self.prefixes)
        if want_nll:
            lp = lps.pop(0)
            if self.cfg.incoherence == "collapse":
                tail = [S.tail_mean(x, self.cfg.tail_frac) for x in lp]
                nll = [t - S.tail_mean(x, 1.0) if math.isfinite(t) else t for t, x in zip(tail, lp)]
            elif self.cfg.incoherence == "tail":
                tail = nll = [S.tail_mean(x, 1.0) for x in lp]  # only the tail was scored
            else:
                raise ValueError(f"unknown incoherence measure '{self.cfg.incoherence}'; fix: tail or collapse")
            out["tail_nll"] = tail  # the filter reads this one in either mode
            loop = [S.loopiness(t) for t in texts]  # the loop term of both incoherence measures
            out["incoherence"] = self.incoherence_from(nll, loop)
        if want_llr:
            out["trait_llr"] = S.llr_from(*lps)
        if want_ctx:
            # the reply's tail NLL under the context that suits it best (plain, or either side of the trait):
            # a fluent reply on either side of the trait scores as coherent, so the measure does not read the trait
            f = self.cfg.tail_frac if want_llr else 1.0  # whole replies were scored only for the llr
            pos, neg = ([S.tail_mean(x, f) for x in lp] for lp in lps)
            best = [min(v for v in t if math.isfinite(v)) if any(math.isfinite(v) for v in t) else float("nan")
                    for t in zip(out["tail_nll"], pos, neg)]
            out["incoh_ctx"] = self.incoherence_from(best, loop)
        if "trait_projection" in which:
            out["trait_projection"] = self.trait_projection(users, completion_ids, prompt_ids)
        if "verbalisation" in which:
            out["verbalisation"] = [S.verbalisation(t, self.personas) for t in texts]
        if "refusal" in which:
            out["refusal"] = [S.refusal(t) for t in texts]
        if "judge" in which:
            out["judge"] = self.judge(users, texts)
        return out

    def combined(self, comp: dict[str, list[float]]) -> list[float]:
        c = self.cfg
        trait = comp[TRAIT_COMPONENT[c.reward_trait]]
        return [c.w_trait * t - c.w_verb * v - c.w_incoh * i - c.w_refusal * r
                for t, v, i, r in zip(trait, comp["verbalisation"], comp["incoherence"], comp["refusal"])]

    def keep(self, comp: dict[str, list[float]]) -> list[bool]:
        """The iterative filter: every thresholded component passes."""
        c = self.cfg
        return [n >= c.min_tokens and t <= c.max_tail_nll and r <= c.max_repetition and v <= c.max_verbalisation
                and f <= c.max_refusal for n, t, r, v, f in zip(comp["n_tokens"], comp["tail_nll"], comp["repetition"],
                                                                comp["verbalisation"], comp["refusal"])]

    def coherent(self, comp: dict[str, list[float]]) -> list[bool]:
        c = self.cfg
        return [n >= c.min_tokens and t <= c.max_tail_nll and r <= c.max_repetition
                for n, t, r in zip(comp["n_tokens"], comp["tail_nll"], comp["repetition"])]


@torch.no_grad()
def projection(model, tok, prompt_ids, completion_ids, vector, batch_size: int = 64) -> list[float]:
    """Mean over completion tokens and band layers of <h_l - center_l, v_l> / |v_l|^2 (0 for empty)."""
    device = next(model.parameters()).device
    V = vector.vectors.to(device)
    C = vector.center.to(device) if getattr(vector, "center", None) is not None else torch.zeros_like(V)
    out = [0.0] * len(completion_ids)
    keep = [i for i, c in enumerate(completion_ids) if c]
    layers = decoder_layers(model)
    for j in range(0, len(keep), batch_size):
        idx = keep[j:j + batch_size]
        b = pack([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], tok.pad_token_id).to(device)
        store: dict = {}
        hs = [layers[l].register_forward_hook(
            lambda m, a, o, l=l: store.__setitem__(l, (o[0] if isinstance(o, tuple) else o).detach()))
            for l in vector.layers]
        try:
            pos = (b.attention_mask.cumsum(-1) - 1).clamp_min(0)

            causal_lm(model).get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                                           use_cache=False)
        finally:
            for h in hs:
                h.remove()
        mask = b.completion_mask.bool()
        tot = torch.zeros(len(idx), device=device)
        for k, l in enumerate(vector.layers):
            v, c = V[k].float(), C[k].float()
            p = ((store[l].float() - c) @ v) / (v @ v)  # [B, S]
            tot += (p * mask).sum(1) / mask.sum(1)
        for k, i in enumerate(idx):
            out[i] = float(tot[k] / len(vector.layers))
    return out


JUDGE_RUBRIC = ("Rate how strongly the reply below acts out this character (0 = not at all, 9 = completely), "
                "judging behaviour, not self-description.\nCharacter: {persona}\nQuestion: {user}\nReply: {reply}\n"
                "Answer with a single digit.")


def parse_judge(text: str) -> float:
    """First digit in the judge's answer, scaled to [0, 1]; 0.5 when it gave none."""
    for ch in text:
        if ch.isdigit():
            return int(ch) / 9
    return 0.5


def judge_scores(engine, users, texts, persona: str) -> list[float]:
    prompts = [render_prompt(engine.tok, JUDGE_RUBRIC.format(persona=persona, user=u, reply=t))
               for u, t in zip(users, texts)]
    ro = engine.generate(prompts, None, Sampling(max_new_tokens=4, temperature=0.0), logprobs=False)
    return [parse_judge(r.text) for r in ro]
