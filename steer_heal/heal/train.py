"""One heal round: fresh LoRA, loss = NLL(kept completions) + lam * relu(D - tau)."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from steer_heal.heal.kl import AGGS, aggregate, barrier, chunked_kl_and_logp
from steer_heal.logprobs import auto_chunk, final_hidden, lm_logits, pack
from steer_heal.models import causal_lm


class HealDivergedError(RuntimeError):
    """A NaN/inf loss; the round is abandoned and the last good round kept."""


@dataclass
class HealResult:
    steps: int = 0
    train_nll: float = float("nan")
    val_nll: float = float("nan")
    val_nll_before: float = float("nan")
    D_mean: float = 0.0
    barrier_frac: float = 0.0
    # per training sequence, over every batch of the round: D under each aggregate (the barrier's own
    # and the others, for the rmse-vs-mean question) and the fraction of sequences over tau
    D_by_agg: dict = field(default_factory=dict)
    active_frac: float = 0.0
    lam: float = 0.0
    tokens: int = 0  # target tokens the heal trained on, each epoch counted (what the gradient read)
    lr_sum: float = 0.0  # sum over optimizer steps of the learning rate each step used
    seconds: float = 0.0
    log: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def round_lam(lam: float, round_idx: int, power: float) -> float:
    return lam * (1 + round_idx) ** power


def heal_terms(student, batch, cfg, ref_ctx):
    """(nll, D per sequence, barrier per sequence, n completion tokens) for one packed batch."""
    model = student.model
    device = next(model.parameters()).device
    batch = batch.to(device)
    b, s, tgt = batch.targets()
    with torch.no_grad(), ref_ctx():
        h_ref = final_hidden(model, batch.input_ids, batch.attention_mask)[b, s]
    h = final_hidden(model, batch.input_ids, batch.attention_mask)[b, s]
    vocab = causal_lm(model).get_output_embeddings().weight.shape[0]
    chunk = cfg.kl_chunk_tokens or auto_chunk(vocab)
    kl, lp = chunked_kl_and_logp(h, h_ref, tgt, lambda x: lm_logits(model, x), chunk,
                                 reverse=cfg.kl_direction == "reverse")
    nll, D, bar = nll_and_barrier(lp, kl, b, batch.input_ids.shape[0], cfg.kl_agg, cfg.kl_tau)
    return nll, D, bar, len(tgt), kl


def nll_and_barrier(lp: torch.Tensor, kl: torch.Tensor, seq: torch.Tensor, n_seq: int, agg: str, tau: float):
    """The heal's two terms from per-token student log p(target) and KL to the reference (rows of
    `seq`): NLL = mean over tokens; D = per-sequence aggregate of KL; barrier = relu(D - tau).
    One implementation for the iterative heal and the online `nll` objective."""
    nll = -lp.mean() if lp.numel() else lp.sum()
    D = aggregate(kl, seq, n_seq, agg)
    return nll, D, barrier(D, tau)


def grad_norm(loss, params) -> float:
    """|d loss / d params| (the graph is kept for the real backward)."""
    if not loss.requires_grad:
        return 0.0
    g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((x.float() ** 2).sum() for x in g if x is not None)))


@torch.no_grad()
def _val_nll(student, batches, cfg, ref_ctx) -> float:
    tot, n = 0.0, 0
    for bt in batches:
        nll, _, _, k, _ = heal_terms(student, bt, cfg, ref_ctx)
        tot, n = tot + float(nll) * k, n + k
    return tot / max(n, 1)


def make_batches(examples: list[tuple[list[int], list[int]]], bs: int, pad_id: int, rng: random.Random | None):
    idx = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(idx)
    return [pack([examples[i][0] for i in idx[j:j + bs]], [examples[i][1] for i in idx[j:j + bs]], pad_id)
            for j in range(0, len(idx), bs)]


def heal_round(student, examples: list[tuple[list[int], list[int]]], cfg, round_idx: int = 0, seed: int = 0,
               progress: bool = True, log_fn=None) -> HealResult:
    """Train the live adapter on (prompt_ids, completion_ids) examples; returns losses and timing."""
    rng = random.Random(seed)
    ex = list(examples)
    rng.shuffle(ex)
    n_val = int(len(ex) * cfg.val_frac) if len(ex) >= 8 else 0
    val, train = ex[:n_val], ex[n_val:]
    pad = student.tok.pad_token_id
    ref_ctx = lambda: student.reference(cfg.kl_reference)  # noqa: E731
    lam = round_lam(cfg.kl_beta, round_idx, cfg.kl_beta_decay_power)
    params = student.live_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum)
    total = max(1, steps_per_epoch * cfg.epochs)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    val_batches = make_batches(val, cfg.batch_size, pad, None)
    res = HealResult(lam=lam)
    student.model.train()
    res.val_nll_before = _val_nll(student, val_batches, cfg, ref_ctx) if val else float("nan")
    t0 = time.perf_counter()
    acc: dict = {"nll": 0.0, "D": 0.0, "bar": 0.0, "n": 0, "seq": 0, "active": 0} | {f"D_{a}": 0.0 for a in AGGS}
    with tqdm(total=total, desc=f"heal r{round_idx}", disable=not progress, leave=False) as bar:  # closed on error too
        for epoch in range(cfg.epochs):
            batches = make_batches(train, cfg.batch_size, pad, rng)
            for i, bt in enumerate(batches):
                nll, D, bar_t, k, kl = heal_terms(student, bt, cfg, ref_ctx)
                pen = bar_t.mean()
                loss = (nll + lam * pen) / cfg.grad_accum
                if not torch.isfinite(loss):
                    raise HealDivergedError(f"heal loss is {float(loss.detach())} at round {round_idx} epoch {epoch}; "
                                            "fix: lower heal.lr or heal.kl_beta (the last good round is kept)")
                log_now = cfg.log_every > 0 and res.steps % cfg.log_every == 0 and (i + 1) % cfg.grad_accum == 0
                if log_now:  # per-term gradient norms on logging steps only (two extra backward passes)
                    g_nll, g_bar = grad_norm(nll, params), grad_norm(lam * pen, params)
                loss.backward()
                res.tokens += k
                acc["nll"] += float(nll.detach()) * k
                acc["D"] += float(D.detach().mean()) * k
                acc["bar"] += float((D > cfg.kl_tau).float().mean()) * k
                acc["n"] += k
                with torch.no_grad():  # every aggregate of the same per-token KL, per sequence
                    seq = bt.targets()[0].to(kl.device)
                    for a in AGGS:
                        acc[f"D_{a}"] += float(aggregate(kl.detach(), seq, len(D), a).sum())
                    acc["seq"] += len(D)
                    acc["active"] += int((D.detach() > cfg.kl_tau).sum())
                if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(batches):
                    gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    res.lr_sum += opt.param_groups[0]["lr"]
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    res.steps += 1
                    bar.update(1)
                    if log_now:
                        row = dict(
                            round=round_idx,
                            step=res.steps,
                            epoch=epoch,
                            nll=float(nll.detach()),
                            D=float(D.detach().mean()),
                            D_max=float(D.detach().max()),
                            barrier_frac=float((D > cfg.kl_tau).float().mean()),
                            grad_nll=g_nll,
                            grad_barrier=g_bar,
                            grad_total=float(gn),
                            lr=sched.get_last_lr()[0],
                        )
                        res.log.append(row)
                        if log_fn:
                            log_fn(row)
    res.seconds = time.perf_counter() - t0
    student.model.eval()
    n = max(acc["n"], 1)
    res.train_nll, res.D_mean, res.barrier_frac = acc["nll"] / n, acc["D"] / n, acc["bar"] / n
    ns = max(acc["seq"], 1)
    res.D_by_agg = {a: acc[f"D_{a}"] / ns for a in AGGS}
    res.active_frac = acc["active"] / ns
    res.val_nll = _val_nll(student, val_batches, cfg, ref_ctx) if val else float("nan")
    return res
