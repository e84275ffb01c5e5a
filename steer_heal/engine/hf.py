"""HF rollout engine: left-padded batched generate under steering hooks, with per-token logprobs."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from steer_heal.chat import encode_prompt
from steer_heal.engine.base import Rollout, Sampling, eos_token_ids
from steer_heal.kvcache import shared_prefill
from steer_heal.logprobs import completion_logprobs, left_pad, pack
from steer_heal.steering.core import Steering
from steer_heal.steering.hooks import steer


@contextmanager
def eval_mode(model):
    """Generation in eval mode, the training flag put back: in train mode (as inside a GRPO step,
    gradient checkpointing on) HF's generate turns off the KV cache and greedy outputs change."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class HFEngine:
    """Serves whatever `model` currently is (baked student; the caller decides adapters)."""

    def __init__(self, model, tok, batch_size: int = 32, progress: bool = False):
        self.model, self.tok, self.batch_size, self.progress = model, tok, batch_size, progress
        self.eos_ids = eos_token_ids(tok, getattr(model, "generation_config", None))
        self.n_generated = 0  # completion tokens generated so far (callers diff it to count a stage's budget)

    @torch.no_grad()
    def generate_batch(self, ids: list[list[int]], steering: Steering | None, sampling: Sampling,
                       return_cache: bool = False, share_prefix: bool = False):
        """One left-padded batch. Returns (completion ids per row, finished flags, and with
        `return_cache` the KV cache, the attention mask and the padded prompt ids it covers).
        `share_prefix`: prompt tokens that several rows share are prefilled once (kvcache.shared_prefill;
        the prompt ids then hold masked holes)."""
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id
        kw = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad, eos_token_id=self.eos_ids)
        if sampling.min_new_tokens:
            kw["min_new_tokens"] = sampling.min_new_tokens
        if sampling.banned:
            kw["bad_words_ids"] = sampling.banned
        if sampling.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with steer(self.model, steering), eval_mode(self.model):
            shared = shared_prefill(self.model, ids, pad) if share_prefix else None
            inp, att, cache = shared if shared is not None else (*left_pad(ids, pad), None)
            out = self.model.generate(input_ids=inp.to(device), attention_mask=att.to(device), past_key_values=cache,
                                      return_dict_in_generate=True, use_cache=True, **kw)
        gen = out.sequences[:, inp.shape[1]:].cpu()
        comps, fins = [], []
        for r in range(len(ids)):
            c, fin = gen[r].tolist(), False
            for t, tokid in enumerate(c):
                if tokid in self.eos_ids:
                    c, fin = c[:t + 1], True
                    break
            comps.append(c)
            fins.append(fin)
        if return_cache:
            return comps, fins, out.past_key_values, att.to(device), inp.to(device)
        return comps, fins

    @torch.no_grad()
    def generate(self, prompts: list[str], steering: Steering | None = None, sampling: Sampling | None = None,
                 logprobs: bool = True, desc: str | None = None) -> list[Rollout]:
        sampling = sampling or Sampling()
        ids = [encode_prompt(self.tok, p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch
        out: list[Rollout | None] = [None] * len(ids)
        torch.manual_seed(sampling.seed)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for idx in tqdm(batches, desc=desc, disable=not (self.progress and desc), leave=False):
            comps, fins = self.generate_batch([ids[i] for i in idx], steering, sampling)
            for i, c, fin in zip(idx, comps, fins):
                out[i] = Rollout(prompt=prompts[i], text=self.tok.decode(c, skip_special_tokens=True),
                                 prompt_ids=ids[i], completion_ids=c, finished=fin)
        if logprobs:
            self.fill_logprobs(out, steering)
        self.n_generated += sum(len(r.completion_ids) for r in out)
        return out  # type: ignore[return-value]

    def sleep(self) -> None:
        """Nothing to free: the HF engine serves the student's own modules."""

    def push(self, student) -> None:
        """Bake-time weight push. The HF engine serves the student's own modules, so it already sees
        the baked weights; engines with their own copy (vLLM) load `student.merged_weights()` here."""

    @torch.no_grad()
    def fill_logprobs(self, rollouts: list[Rollout], steering: Steering | None) -> None:
        """Behaviour-policy logprobs (steered, temperature 1) by one teacher-forced pass per batch."""
        for i in range(0, len(rollouts), self.batch_size):
            part = [r for r in rollouts[i:i + self.batch_size] if r.completion_ids]
            if not part:
                continue
            batch = pack([r.prompt_ids for r in part], [r.completion_ids for r in part], self.tok.pad_token_id)
            with steer(self.model, steering), eval_mode(self.model):
                lps = completion_logprobs(self.model, batch)
            for r, lp in zip(part, lps):
                r.logprobs = lp.tolist()
