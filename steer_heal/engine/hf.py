"""HF rollout engine: left-padded batched generate under steering hooks, with per-token logprobs."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from steer_heal.chat import encode_prompt
from steer_heal.engine.base import Rollout, Sampling
from steer_heal.logprobs import completion_logprobs, pack
from steer_heal.steering.core import Steering
from steer_heal.steering.hooks import steer


class HFEngine:
    """Serves whatever `model` currently is (baked student; the caller decides adapters)."""

    def __init__(self, model, tok, batch_size: int = 32, progress: bool = False):
        self.model, self.tok, self.batch_size, self.progress = model, tok, batch_size, progress
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        ids = {self.tok.eos_token_id}
        gc = getattr(self.model, "generation_config", None)
        e = getattr(gc, "eos_token_id", None)
        ids.update(e if isinstance(e, list) else [e])
        return sorted(i for i in ids if i is not None)

    @torch.no_grad()
    def generate(self, prompts: list[str], steering: Steering | None = None, sampling: Sampling | None = None,
                 logprobs: bool = True, desc: str | None = None) -> list[Rollout]:
        sampling = sampling or Sampling()
        device = next(self.model.parameters()).device
        ids = [encode_prompt(self.tok, p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch
        out: list[Rollout | None] = [None] * len(ids)
        torch.manual_seed(sampling.seed)
        pad = self.tok.pad_token_id
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for idx in tqdm(batches, desc=desc, disable=not (self.progress and desc), leave=False):
            L = max(len(ids[i]) for i in idx)
            inp = torch.full((len(idx), L), pad, dtype=torch.long)
            att = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):
                inp[r, L - len(ids[i]):] = torch.tensor(ids[i])
                att[r, L - len(ids[i]):] = 1
            kw = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad, eos_token_id=self.eos_ids)
            if sampling.greedy:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            with steer(self.model, steering):
                seq = self.model.generate(input_ids=inp.to(device), attention_mask=att.to(device), **kw)
            gen = seq[:, L:].cpu()
            for r, i in enumerate(idx):
                c = gen[r].tolist()
                fin = False
                for t, tokid in enumerate(c):
                    if tokid in self.eos_ids:
                        c, fin = c[:t + 1], True
                        break
                out[i] = Rollout(prompt=prompts[i], text=self.tok.decode(c, skip_special_tokens=True),
                                 prompt_ids=ids[i], completion_ids=c, finished=fin)
        if logprobs:
            self.fill_logprobs(out, steering)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def fill_logprobs(self, rollouts: list[Rollout], steering: Steering | None) -> None:
        """Behaviour-policy logprobs (steered, temperature 1) by one teacher-forced pass per batch."""
        for i in range(0, len(rollouts), self.batch_size):
            part = [r for r in rollouts[i:i + self.batch_size] if r.completion_ids]
            if not part:
                continue
            batch = pack([r.prompt_ids for r in part], [r.completion_ids for r in part], self.tok.pad_token_id)
            with steer(self.model, steering):
                lps = completion_logprobs(self.model, batch)
            for r, lp in zip(part, lps):
                r.logprobs = lp.tolist()
