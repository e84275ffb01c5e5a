"""GRPOTrainer subclass (trl==1.16.0): the online objectives plus the RMSE reverse-KL barrier.

Objectives (`Objective.name`), each + kl.beta * relu(D - kl.tau), D the exact per-position KL to
the reference aggregated per sequence (rmse by default) by the same functions as the iterative heal:

    grpo      TRL's policy loss. With num_iterations=1 the ratio is 1 and the gradient is
              -sum_i A_i grad log pi(y_i) with group-centred A: whatever every steered rollout
              shares (the steering shift) cancels. Kept as an ablation arm.
    nll       the online heal: NLL of the rollouts that pass the iterative filter (Scorer.keep),
              token-mean, barrier over the same rollouts (heal.train.nll_and_barrier).
    grpo+nll  w_pg * policy loss + w_nll * filtered NLL (barrier over all rollouts).
    kd        dense distillation: token-mean KL(teacher || student) at the kept rollouts'
              completion positions, teacher = the steered baked student (same hooks as the engines).
    opd       on-policy distillation: the rollouts come from the student itself (baked + live LoRA,
              unsteered); the steered baked student scores the same tokens. `token` estimator: the
              per-token advantage A_t = log p_T(y_t) - log p_S(y_t) (held constant) goes through TRL's
              policy loss, whose gradient at ratio 1 is -sum_t A_t grad log p_S(y_t): in expectation
              the gradient of KL(student || teacher) on the student's own states. `full`: the exact
              full-vocabulary KL(student || teacher) per position, token mean (lower variance).
              No filter (every rollout is the student's own), barrier over all rollouts.

One student forward with gradients per micro-batch: the policy term, the NLL and both KLs are read
from the same final hidden states (TRL's `_get_per_token_logps_and_entropies` is served from them).
Reference and teacher forwards run without gradients.
"""
from __future__ import annotations

import logging
import time

import torch
from trl import GRPOTrainer

from steer_heal.grpo.advantage import (
    advantage_parts,
    advantages,
    dose_correlation,
    policy_terms,
    reward_diagnostics,
    sequence_mean_loss,
)
from steer_heal.grpo.objective import KLPenalty, Objective, OnlineConfigError, check_online_args
from steer_heal.grpo.penalty import trl_batch_rows
from steer_heal.grpo.rollout import global_sums
from steer_heal.heal.kl import AGGS, aggregate, barrier, chunked_token_stats
from steer_heal.heal.train import HealDivergedError, grad_norm, nll_and_barrier
from steer_heal.logprobs import auto_chunk, final_hidden, lm_logits
from steer_heal.models import causal_lm
from steer_heal.steering.hooks import steer

log = logging.getLogger("steer_heal.grpo")

TIMERS = ("rollout", "scoring", "ref_forward", "teacher", "push")  # logged as time/<name>, seconds per step



def student_hidden(model, inner, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, S, d] with gradients. Through a DDP wrapper the forward must go through
    the wrapper (its gradient all-reduce is armed in forward): the full model runs with no logits
    kept and a hook on the decoder reads its output."""
    if model is inner:
        return final_hidden(inner, ids, att)
    lm = causal_lm(inner)
    store: dict = {}

    def grab(module, args, out):
        store["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = lm.get_decoder().register_forward_hook(grab)
    try:
        pos = (att.cumsum(-1) - 1).clamp_min(0)
        model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False,
              logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device))
    finally:
        handle.remove()
    return store["h"]


class SteerHealGRPOTrainer(GRPOTrainer):
    """`steer_state` (what generates the rollouts), `scorer` (the filter flags), `timers` (the rollout
    function's), `event` (events.jsonl, main rank only) and `diag_every` (steps between per-term
    gradient norms; 0: none) come in through the constructor."""

    def __init__(self, *args, student, kl: KLPenalty, objective: Objective, controller=None, steer_state=None,
                 scorer=None, timers: dict | None = None, event=None, diag_every: int = 0, **kwargs):
        self.objective = o = objective
        check_online_args(kwargs["args"] if "args" in kwargs else args[2], o.name, o.opd_estimator, o.reward_norm,
                          o.is_correction)
        super().__init__(*args, **kwargs)
        if self.beta != 0.0:
            raise OnlineConfigError("GRPOConfig.beta must be 0: steer-heal replaces TRL's mean-k3 KL with its RMSE "
                                    "barrier; fix: set the penalty with kl_beta instead")
        self.student = student
        self.kl = kl
        self.controller = controller  # online dose controller: fed the filter scores of each generation batch
        self.steer_state, self.scorer, self.event, self.diag_every = steer_state, scorer, event, diag_every
        self.timers: dict[str, float] = {} if timers is None else timers  # seconds, logged as deltas
        self._timers_seen: dict[str, float] = {}
        self._rewards = None  # this generation batch's per-function rewards, all ranks [N, K]
        self._stash = None  # (per-token logps, entropies) of the fused forward, read by TRL's policy loss
        self.trained_tokens = 0  # completion tokens the loss read, all ranks, since this process started
        self.debug_nan_step = 0  # testing (OnlineConfig.debug_nan_step): the last rank's loss is NaN at this step
        # the engine serves the steered teacher and the learner is unsteered: they are meant to differ
        self.vllm_importance_sampling_correction = False
        log.warning("importance-sampling correction between the rollout engine and the trainer is OFF by design: "
                    "rollouts come from the steered baked student, the learner is the unsteered student + live LoRA")

    # ------------------------------------------------------------ generation: filter flags, dose
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards

    def _generate_and_score_completions(self, inputs):
        steer_state = self.steer_state
        kappa = None if steer_state is None else float(steer_state.kappa)  # the dose that generates this batch
        out = super()._generate_and_score_completions(inputs)
        self._reward_signal(out)
        scorer = self.scorer
        last = getattr(self.rollout_func, "last", None) if self.rollout_func is not None else None
        mode = "train" if self.model.training else "eval"
        if scorer is not None and last is not None:
            users, ids = last
            texts = [self.processing_class.decode(c, skip_special_tokens=True) for c in ids]
            # the reward functions scored this batch already: the scorer's memo answers without a forward
            comp = scorer.components(users, ids, texts, which=["incoherence", "verbalisation", "refusal"])
            keep = scorer.keep(comp)
            if self.controller is not None:
                self.controller.observe(comp)
                self._metrics[mode]["dose_bad_rate"].append(self.controller.last_rate)
            out["keep"] = torch.tensor(keep, dtype=torch.float32, device=out["completion_ids"].device)
            self._metrics[mode]["keep_frac"].append(float(self.accelerator.gather(out["keep"]).mean()))
        if kappa is not None:
            self._metrics[mode]["kappa"].append(kappa)
            self._metrics[mode]["bake_round"].append(float(steer_state.bake_round))
        return out

    def _reward_signal(self, out) -> None:
        """per_term advantages, and what the reward gives the advantage: each component's mean, sd and share
        of the within-group variance, groups with sd 0, the advantage's correlation with the dose inside
        groups; each rollout's dose, rewards and advantage to events.jsonl."""
        if self._rewards is None:
            return
        mode = "train" if self.model.training else "eval"
        m, G = self._metrics[mode], (self.num_generations if mode == "train" else self.num_generations_eval)
        trl_w = self.reward_weights.to(self._rewards.device)
        rewards = (self._rewards * trl_w).nan_to_num(0.0).cpu()  # the summed reward's parts, as TRL sums them
        n_local = len(out["advantages"])
        local = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
        norm = self.objective.reward_norm
        w = [abs(getattr(f, "weight", 1.0)) for f in self.reward_funcs]
        if norm == "per_term":
            A = advantages(rewards, w, G, "per_term", scale=self.scale_rewards != "none")
            out["advantages"] = A[local].to(out["advantages"].device, out["advantages"].dtype)
        else:
            A = self.accelerator.gather(out["advantages"].detach()).cpu()
        diag = reward_diagnostics(rewards, list(self.reward_func_names), G, advantage_parts(rewards, w, G, norm))
        for k, v in diag.items():
            m[k if k == "groups_zero_sd" else f"rewards/{k}"].append(v)
        doses = list(getattr(self.rollout_func, "doses", None) or [])
        dose = self.accelerator.gather(torch.tensor(doses, dtype=torch.float32, device=self.accelerator.device)).cpu() \
            if len(doses) == n_local else None
        corr = dose_correlation(A, dose, G) if dose is not None else float("nan")
        if corr == corr:  # nan: no group spans two doses
            m["adv_dose_corr"].append(corr)
        if self.event is not None and mode == "train":
            r5 = lambda xs: [round(float(x), 5) for x in xs]  # noqa: E731
            self.event("rollouts", step=int(self.state.global_step), group=G,
                       dose=r5(dose) if dose is not None else None, advantage=r5(A),
                       rewards={n: r5(rewards[:, k]) for k, n in enumerate(self.reward_func_names)})
            self.event("reward_signal", step=int(self.state.global_step), adv_dose_corr=corr if corr == corr else None,
                       **{k: (round(v, 6) if v == v else None) for k, v in diag.items()})

    # ------------------------------------------------------------ loss
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        if self._stash is not None:  # served from the fused forward (see _compute_loss)
            lp, ent = self._stash
            self._stash = None
            return lp, ent, None
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *a, **kw)

    def _student_terms(self, model, inputs, entropy: bool):
        """One student forward (with gradients) and, without, the reference and the steered teacher."""
        k, obj = self.kl, self.objective.name
        inner = self.accelerator.unwrap_model(model)  # DDP wrapper -> the PeftModel (same parameters)
        pi, pm = inputs["prompt_ids"], inputs["prompt_mask"]
        ci, cm = inputs["completion_ids"], inputs["completion_mask"]
        ids = torch.cat([pi, ci], 1)
        att, b, pos, t = trl_batch_rows(pm, cm)
        tgt = ci[b, t]
        refs = []
        if k.beta != 0.0:
            t0 = time.perf_counter()
            with torch.no_grad(), self.student.reference(k.reference):
                refs.append((final_hidden(inner, ids, att)[b, pos], k.direction == "reverse"))
            self.timers["ref_forward"] = self.timers.get("ref_forward", 0.0) + time.perf_counter() - t0
        head = (lambda x: lm_logits(inner, x))  # noqa: E731
        vocab = causal_lm(inner).get_output_embeddings().weight.shape[0]
        chunk = k.chunk or auto_chunk(vocab)
        lp_teacher = None
        if self.objective.teacher:
            t0 = time.perf_counter()
            with torch.no_grad(), self.student.live_off(), steer(inner, self.steer_state.steering):
                h_t = final_hidden(inner, ids, att)[b, pos]
            if obj == "kd":
                refs.append((h_t, False))  # KL(teacher || student)
            elif self.objective.opd_estimator == "full":
                refs.append((h_t, True))  # KL(student || teacher), with gradient through the student
            else:  # the teacher's log-prob of each sampled token
                with torch.no_grad():
                    lp_teacher, _, _ = chunked_token_stats(h_t, tgt, head, (), chunk)
            self.timers["teacher"] = self.timers.get("teacher", 0.0) + time.perf_counter() - t0
        h = student_hidden(model, inner, ids, att)[b, pos]
        lp, ent, kls = chunked_token_stats(h, tgt, head, refs, chunk, entropy=entropy)
        kl_ref = kls[0] if k.beta != 0.0 else None
        kl_teacher = kls[-1] if (obj == "kd" or (obj == "opd" and lp_teacher is None)) else None
        return dict(b=b, t=t, lp=lp, ent=ent, kl_ref=kl_ref, kl_teacher=kl_teacher, lp_teacher=lp_teacher,
                    shape=ci.shape)

    def opd_advantages(self, s: dict) -> torch.Tensor:
        """Per-token advantages [B, T] of the token estimator: log p_T(y_t) - log p_S(y_t), constant."""
        a = (s["lp_teacher"] - s["lp"].detach()).to(s["lp"].dtype)
        return torch.zeros(s["shape"], dtype=a.dtype, device=a.device).index_put((s["b"], s["t"]), a)

    def _diag_step(self, mode: str) -> bool:
        return bool(self.diag_every) and mode == "train" and self.state.global_step % self.diag_every == 0

    def _grad_norms(self, m, terms: dict) -> None:
        """|grad| of each loss term as it enters the total (weighted, accumulation-scaled), on the live LoRA."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for name, term in terms.items():
            m[f"grad/{name}"].append(grad_norm(term, params))

    def _corrected_policy(self, s: dict, inputs, m) -> torch.Tensor:
        """The policy term weighted by the ratio of the learner to the behaviour policy that sampled
        (grpo/advantage.py), aggregated as loss_type grpo."""
        o = self.objective
        mu = inputs.get("sampling_per_token_logps")
        if mu is None:
            raise OnlineConfigError(f"is_correction {o.is_correction} needs the behaviour log-probs of each rollout; "
                                    "fix: a rollout_func that returns logprobs (steer-heal's does)")
        b, t, lp = s["b"], s["t"], s["lp"]
        adv = inputs["advantages"].to(lp.device)
        a_tok = (adv[b] if adv.dim() == 1 else adv[b, t]).to(lp.dtype)
        per_tok, ratio = policy_terms(lp, mu.to(lp.device)[b, t], a_tok, o.is_correction, o.is_cap, o.is_gamma)
        if len(ratio):
            m["is_ratio/mean"].append(float(ratio.mean()))
            m["is_ratio/min"].append(float(ratio.min()))
            m["is_ratio/max"].append(float(ratio.max()))
            m["is_ratio/over_cap"].append(float((ratio > o.is_cap).float().mean()))
        return sequence_mean_loss(per_tok, b, s["shape"][0])

    # ------------------------------------------------------------ one loss per objective (LOSSES)
    def _pg(self, c: dict, inputs=None) -> torch.Tensor:
        """The policy term: TRL's policy loss (read from our forward's log-probs when fused, else from TRL's own
        forward), or ours weighted by the ratio to the behaviour policy (is_correction)."""
        inputs = c["inputs"] if inputs is None else inputs
        if self.objective.corrected:
            return self._corrected_policy(c["s"], inputs, c["m"]) / c["norm"]
        if c["fused"]:
            s, lp = c["s"], c["s"]["lp"]
            lp_bt = torch.zeros(s["shape"], dtype=lp.dtype, device=lp.device).index_put((s["b"], s["t"]), lp)
            ent_bt = torch.zeros(s["shape"], dtype=lp.dtype, device=lp.device).index_put((s["b"], s["t"]), s["ent"])
            self._stash = (lp_bt, ent_bt)
            try:
                return super()._compute_loss(c["model"], inputs)
            finally:
                self._stash = None
        return c["pg"] if c["pg"] is not None else super()._compute_loss(c["model"], inputs)

    def _nll(self, c: dict) -> torch.Tensor:
        """The filtered NLL of the kept rollouts (token mean), the heal's loss."""
        s, kp = c["s"], c["kept"]
        kl_k = s["kl_ref"][kp["tok"]] if s["kl_ref"] is not None else s["lp"].new_zeros(int(kp["tok"].sum()))
        nll, _, _ = nll_and_barrier(s["lp"][kp["tok"]], kl_k, kp["seq"][s["b"][kp["tok"]]], kp["n"], self.kl.agg,
                                    self.kl.tau)
        c["m"]["nll_kept"].append(float(nll.detach()))
        return nll / c["norm"]

    def _loss_grpo(self, c: dict) -> dict:
        return {"policy": self._pg(c)}

    def _loss_nll(self, c: dict) -> dict:
        return {"nll": self._nll(c)}

    def _loss_grpo_nll(self, c: dict) -> dict:
        o = self.objective
        return {"policy": o.w_pg * self._pg(c), "nll": o.w_nll * self._nll(c)}

    def _loss_kd(self, c: dict) -> dict:
        s, kp = c["s"], c["kept"]
        kd = s["kl_teacher"][kp["tok"]].mean() if kp["n"] else s["kl_teacher"].sum() * 0.0
        c["m"]["kd"].append(float(kd.detach()))
        return {"kd": kd / c["norm"]}

    def _loss_opd(self, c: dict) -> dict:
        s, lp, m = c["s"], c["s"]["lp"], c["m"]
        if s["lp_teacher"] is not None:  # token: the sampled-token advantages, through TRL's policy loss
            m["opd_kl"].append(float((lp.detach() - s["lp_teacher"]).mean()) if len(lp) else 0.0)
            return {"opd": self._pg(c, {**c["inputs"], "advantages": self.opd_advantages(s)})}
        kl_t = s["kl_teacher"]  # full: exact reverse KL per position, token mean
        m["opd_kl"].append(float(kl_t.detach().mean()) if len(lp) else 0.0)
        return {"opd": (kl_t.mean() if len(kl_t) else kl_t.sum() * 0.0) / c["norm"]}

    LOSSES = {"grpo": _loss_grpo, "nll": _loss_nll, "grpo+nll": _loss_grpo_nll, "kd": _loss_kd, "opd": _loss_opd}

    def _kept(self, s: dict, inputs) -> dict:
        """The rollouts trained on: those the filter kept (opd: every one, each is the student's own)."""
        keep = inputs.get("keep")
        if keep is None or self.objective.name == "opd":
            keep = torch.ones(s["shape"][0], device=s["lp"].device)
        keep = keep.to(s["lp"].device)
        # kept sequences renumbered 0..n_kept-1
        return dict(tok=keep[s["b"]] > 0, seq=keep.gt(0).long().cumsum(0) - 1, n=int(keep.gt(0).sum()))

    def _barrier(self, c: dict, terms: dict) -> dict:
        """The barrier term (into `terms`) and this rank's partial sums of the KL diagnostics."""
        k, s, kp = self.kl, c["s"], c["kept"]
        b, n = s["b"], s["shape"][0]
        part = dict.fromkeys(("kl_rmse", "kl_mean", "kl_p95", "kl_max", "n_seq", "active", "n_D", "kl_penalty"), 0.0)
        if s["kl_ref"] is None:
            return part
        kl = s["kl_ref"]
        if self.objective.name in ("nll", "kd", "opd"):  # the barrier acts on the rollouts trained on, as in the heal
            D = aggregate(kl[kp["tok"]], kp["seq"][b[kp["tok"]]], kp["n"], k.agg)
        else:
            D = aggregate(kl, b, n, k.agg)
        pen = k.beta * barrier(D, k.tau).sum() / max(len(D), 1)
        terms["barrier"] = pen / c["norm"]
        with torch.no_grad():
            part.update(**{f"kl_{a}": float(aggregate(kl.detach(), b, n, a).sum()) for a in AGGS}, n_seq=float(n),
                        active=float((D.detach() > k.tau).sum()), n_D=float(len(D)), kl_penalty=float(pen.detach()))
        return part

    def _compute_loss(self, model, inputs):
        k, o = self.kl, self.objective
        mode = "train" if self.model.training else "eval"
        m = self._metrics[mode]
        diag = self._diag_step(mode)
        if o.name == "grpo" and k.beta == 0.0 and not o.corrected:
            loss = super()._compute_loss(model, inputs)  # nothing of ours to add: TRL's loss as is
            if diag:
                self._grad_norms(m, {"policy": loss})
            self._reduce_and_check(m, dict(n_trained=float(inputs["completion_mask"].sum())), loss, kl_on=False)
            return loss
        trl_pg = o.pg and not o.corrected
        fused = o.fused and trl_pg and not self.aux_loss_enabled
        # the two-forward path: TRL's own forward for the policy term, first
        pg = super()._compute_loss(model, inputs) if trl_pg and not fused and o.name != "opd" else None
        s = self._student_terms(model, inputs, entropy=fused)
        c = dict(model=model, inputs=inputs, s=s, m=m, fused=fused, pg=pg, kept=self._kept(s, inputs),
                 norm=self.current_gradient_accumulation_steps if mode == "train" else 1.0)
        terms = self.LOSSES[o.name](self, c)  # each term as it enters the total
        # per-rank partial sums, reduced below in one all-reduce that every rank reaches
        part = self._barrier(c, terms)
        # the tokens the loss reads: the kept rollouts' for nll and kd, every rollout's where a policy term reads all
        part["n_trained"] = float(c["kept"]["tok"].sum() if o.name in ("nll", "kd") else len(s["lp"]))
        total = s["lp"].new_zeros(())
        for x in terms.values():
            total = total + x
        if diag:
            self._grad_norms(m, terms)
        if self.debug_nan_step and self.state.global_step + 1 == self.debug_nan_step \
                and self.accelerator.process_index == self.accelerator.num_processes - 1:
            total = total * float("nan")  # testing: one rank diverges; every rank must stop
        self._reduce_and_check(m, part, total, kl_on=s["kl_ref"] is not None)
        return total

    def _reduce_and_check(self, m, part: dict, total: torch.Tensor, kl_on: bool) -> None:
        """KL and timing metrics over all ranks, and divergence seen by all ranks: one all-reduce per
        micro-batch, so a NaN on one rank stops every rank (none is left waiting in a collective)."""
        if self.scorer is not None:
            self.timers["scoring"] = self.scorer.seconds
        deltas = [self.timers.get(name, 0.0) - self._timers_seen.get(name, 0.0) for name in TIMERS]
        bad = 0.0 if bool(torch.isfinite(total.detach())) else 1.0
        keys = list(part)
        red = global_sums([part[x] for x in keys] + deltas + [bad, 1.0], self.accelerator.device)
        g = dict(zip(keys, red))
        n_bad, world = red[-2], red[-1]
        self.trained_tokens += int(g.get("n_trained", 0.0))  # all ranks, this micro-batch
        if n_bad:
            raise HealDivergedError(f"GRPO loss is not finite on {int(n_bad)} of {int(world)} rank(s) at step "
                                    f"{self.state.global_step}; fix: lower learning_rate or kl_beta and resume from "
                                    "the last checkpoint")
        if kl_on:
            for a in AGGS:  # per-sequence D under every aggregate, whichever the barrier uses
                m[f"kl_{a}"].append(g[f"kl_{a}"] / max(g["n_seq"], 1.0))
            m["barrier_active_frac"].append(g["active"] / g["n_D"] if g["n_D"] else 0.0)
            m["kl_penalty"].append(g["kl_penalty"] / world)
        for name, d in zip(TIMERS, red[len(keys):len(keys) + len(TIMERS)]):
            if name in self.timers:
                m[f"time/{name}"].append(d / world)  # seconds per rank, averaged over ranks
                self._timers_seen[name] = self.timers[name]
