"""The online run: steered GRPO with periodic bakes, an online dose controller and a bake table.

    student = original weights + baked history + live LoRA (updated every batch)
    engine  = serves the baked student + kappa * v (never the live LoRA)
    every `bake_every` steps: fold the live LoRA into the history, fresh LoRA + optimizer state,
    re-extract v, push to the engine, evaluate, save the bake's adapter + vector, one table row.

Settings: the same declarations as the iterative loop (steer_heal/config.py), read flat:
`OnlineConfig` is generated from them and parsed by TrlParser next to trl.GRPOConfig.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from reward.trl_rewards import make_reward_functions
from steer_heal import stages
from steer_heal.chat import render_prompt
from steer_heal.config import ONLINE, ConfigError, RunConfig, check_control, flat_dataclass, from_flat
from steer_heal.console import StepLine, StepPrinter
from steer_heal.dose import DoseController
from steer_heal.evals.mfv import mfv_columns
from steer_heal.grpo.distributed import check_launch, reset_optimizer_state, sync_master_weights
from steer_heal.grpo.objective import KLPenalty, Objective, OnlineConfigError, check_online_args
from steer_heal.grpo.rollout import SteerState, global_sums, make_rollout_func
from steer_heal.grpo.trainer import SteerHealGRPOTrainer
from steer_heal.report import write_bake_report
from steer_heal.rundir import BAKE_COLUMNS, RunDir, RunDirError, format_table, student_record, write_atomic
from steer_heal.steering import SteeringVector

# recipes/grpo_heal.py's script arguments: every setting the online mode reads, flat, with its help
OnlineConfig = flat_dataclass(ONLINE, "OnlineConfig")

REWARD_TRAITS = ("llr", "projection")


def logged_doses(run_dir: Path, lo: int, hi: int) -> list[float]:
    """The distinct doses the rollouts of steps lo..hi-1 were generated at, from the run's own events.jsonl
    (`rollout_doses`, written as they were sampled): a bake's realised doses, read, not recomputed."""
    f = Path(run_dir) / "events.jsonl"
    seen = set()
    for line in f.read_text().splitlines() if f.exists() else []:
        e = json.loads(line)
        if e.get("event") == "rollout_doses" and lo <= e.get("step", -1) < hi:
            seen.update(e["doses"])
    return sorted(seen)


def check_online_config(cfg: RunConfig, grpo_args) -> None:
    """One-line refusals, before any model is loaded."""
    try:  # every declared setting's allowed values (reward_ablation's names among them)
        cfg = cfg if isinstance(cfg, RunConfig) else from_flat(cfg)
    except ConfigError as e:
        raise OnlineConfigError(str(e)) from None
    r = cfg.reward
    if r.reward_trait not in REWARD_TRAITS:
        hint = (" (the judge needs a second chat model that the online recipe does not build)"
                if r.reward_trait == "judge" else "")
        raise OnlineConfigError(f"reward_trait '{r.reward_trait}' is not available online{hint}; fix: "
                                f"reward_trait: llr or projection")
    if getattr(grpo_args, "use_vllm", False):
        raise OnlineConfigError("use_vllm=true would make TRL build its own unsteered vLLM; fix: set use_vllm: false "
                                "and engine: vllm (the steered engine serves the rollouts)")
    if cfg.vllm.lora_sync and (cfg.engine != "vllm" or cfg.online.objective != "opd"):
        raise OnlineConfigError(f"vllm_lora_sync serves the learner's live LoRA to the vLLM engine, which only "
                                f"objective opd samples from (here: engine {cfg.engine}, objective "
                                f"{cfg.online.objective}); fix: remove vllm_lora_sync, or use engine vllm with opd")
    ra = cfg.online.rollout_alphas
    if ra and (min(ra) < 0 or max(ra) <= 0 or cfg.online.objective == "opd" or cfg.control):
        raise OnlineConfigError(f"rollout_alphas {ra} needs multipliers >= 0, one of them positive, on a steered run "
                                "(not opd, whose rollouts are the learner's own, and not a control, which is "
                                "unsteered); fix: remove rollout_alphas or use e.g. [0, 1, 2] on a steered arm")
    try:
        check_control(cfg.control, cfg.online.objective)
    except ConfigError as e:
        raise OnlineConfigError(str(e)) from None
    o = cfg.online
    check_online_args(grpo_args, o.objective, o.opd_estimator, o.reward_norm, o.is_correction)
    if o.is_cap <= 0 or o.is_gamma <= 0:
        raise OnlineConfigError(f"is_cap {o.is_cap} and is_gamma {o.is_gamma} must be positive; fix: e.g. is_cap: 3.0, "
                                "is_gamma: 0.1")
    check_launch(grpo_args, cfg.engine)


def apply_grpo_args(cfg: RunConfig, a) -> None:
    """The settings TRL already declares are read from GRPOConfig, not declared twice."""
    cfg.vllm.gpu_memory_utilization = a.vllm_gpu_memory_utilization
    cfg.vllm.sleep = a.vllm_enable_sleep_mode
    cfg.vllm.max_model_len = a.vllm_max_model_length or 2048
    cfg.run_dir = cfg.run_dir or a.output_dir


# ------------------------------------------------------------------ bakes and checkpoints
class BakeCallback(TrainerCallback):
    """Every `bake_every` optimizer steps: bake, refresh, evaluate, record. Also saves and restores
    steer-heal state with TRL checkpoints."""

    def __init__(self, run: "OnlineRun"):
        self.run = run
        self.t0 = time.perf_counter()

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        if optimizer is not None:  # the learning rate this optimizer step uses (the scheduler steps after it)
            self.run.lr_sum += optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        if state.global_step % self.run.cfg.online.bake_every == 0:
            self.run.bake(state, optimizer, time.perf_counter() - self.t0)
            self.t0 = time.perf_counter()
            control.should_log = True  # this step's metrics are logged now; the row is written in on_log
            budget = self.run.cfg.budget_tokens
            if budget and self.run.state.gen_tokens >= budget:  # a bake boundary at or past the budget
                if self.run.main:
                    self.run.event("stop_budget", step=state.global_step, gen_tokens=self.run.state.gen_tokens,
                                   budget=budget)
                control.should_training_stop = True
                control.should_save = True

    def on_log(self, args, state, control, logs=None, **kw):
        self.run.finish_bake_row(state)

    def on_save(self, args, state, control, **kw):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.exists():
            self.run.save_state(ckpt / "steer_heal_state")
        stop = self.run.cfg.online.stop_after_step
        if stop and state.global_step >= stop:
            raise SystemExit(3)


class OnlineRun:
    """Holds the built stages (student, engine, preset), the steering state and the run directory."""

    def __init__(self, cfg, grpo_args, seed: int | None = None):
        cfg = cfg if isinstance(cfg, RunConfig) else from_flat(cfg)
        apply_grpo_args(cfg, grpo_args)
        check_online_config(cfg, grpo_args)
        self.cfg, self.grpo_args = cfg, grpo_args
        seed = grpo_args.seed if seed is None else seed
        ps = PartialState()
        self.main = ps.is_main_process  # only rank 0 writes, evaluates and prints
        # each rank samples its own prompts: a distinct engine seed per rank; the first live LoRA is shared
        self.b = stages.build(cfg, engine_seed=seed + ps.process_index, live_seed=seed * 1000 - 1)
        self.rd = RunDir(cfg.run_dir, cfg, resume=True, rows_file="bakes.jsonl", table_file="bake_table.md",
                         write=self.main)
        self.state: SteerState | None = None
        self.tr: SteerHealGRPOTrainer | None = None
        # counters of what the student trained on, and where the last bake row left them
        self.lr_sum = 0.0
        last = self.rd.rows()[-1:] if self.main else []
        self._seen = dict(trained=0, step=int(last[0]["step"]) if last else 0, lr=0.0)
        self.v0 = None
        self.base: dict = {}
        self.pending_row: dict | None = None  # a bake's row, completed with its step's logs in on_log
        self.finished = False  # set by setup: a resumed run whose budget was already reached

    @property
    def student(self):
        return self.b.student

    @property
    def engine(self):
        return self.b.engine

    @property
    def preset(self):
        return self.b.preset

    @property
    def tok(self):
        return self.b.tok

    def event(self, kind: str, **kw) -> None:
        if self.main:
            self.rd.event(kind, **kw)

    # ------------------------------------------------------------ start
    def setup(self, resume_from: str | None = None):
        """Vector, kappa, base evaluation; or the state saved in a TRL checkpoint."""
        s = self.cfg.steer
        self.v0_path = self.rd.path / "vector_r0.safetensors"
        if resume_from:
            st = Path(resume_from) / "steer_heal_state"
            meta = json.loads((st / "state.json").read_text())
            if meta["n_bakes"]:
                self.student.load_cumulative(st / "cumulative")
                self.engine.push(self.student)
            self.state = SteerState(SteeringVector.load(st / "vector.safetensors"), meta["kappa"], meta["n_bakes"],
                                    meta.get("gen_tokens", 0))
            step = meta["step"]
            if self.main:
                self.rd.truncate_rows(lambda r: r["step"] <= step)  # rows past the checkpoint are redone
            self.event("resume", checkpoint=str(resume_from), step=step, bakes=meta["n_bakes"])
            budget = self.cfg.budget_tokens
            # killed after the checkpoint of the bake that reached the budget: the run was done, nothing to train
            self.finished = bool(budget and self.state.gen_tokens >= budget and meta["n_bakes"]
                                 and step % self.cfg.online.bake_every == 0)
        else:
            if self.main and self.rd.rows():
                raise RunDirError(f"run directory '{self.rd.path}' already holds bakes; fix: pass "
                                  "--resume_from_checkpoint <its checkpoint> or a new --output_dir")
            v = stages.extract(self.b)
            if cfg_control := self.cfg.control:  # a control generates without steering: dose 0, no calibration
                kappa, tokens = 0.0, 0
                self.event("control", control=cfg_control)
            else:
                kappa, tokens = stages.starting_dose(self.b, v, self.event if self.main else None)
            if not self.cfg.control:
                kappa = min(s.kappa_max, max(s.kappa_min, kappa))  # the controller's range
            self.state = SteerState(v, kappa, 0, tokens)
        self.v0 = SteeringVector.load(self.v0_path) if self.v0_path.exists() else self.state.vector
        if self.main and not self.v0_path.exists():
            self.v0.save(self.v0_path)
        projection = self.cfg.reward.reward_trait == "projection"
        self.scorer = stages.scorer(self.b, self.state.vector if projection else None)
        self.heldout = stages.heldout(self.b)
        if self.main:
            self.base = stages.base_eval(self.b, self.rd, self.scorer, progress=False, heldout=self.heldout)

    def save_state(self, d: Path) -> None:
        if not self.main:
            return
        d.mkdir(parents=True, exist_ok=True)
        if self.student.n_bakes:
            self.student.save_cumulative(d / "cumulative")
        self.state.vector.save(d / "vector.safetensors")
        step = int(d.parent.name.split("-")[-1])
        write_atomic(d / "state.json", json.dumps(dict(n_bakes=self.student.n_bakes, kappa=self.state.kappa,
                                                       step=step, gen_tokens=self.state.gen_tokens)))

    # ------------------------------------------------------------ bake
    def bake(self, trainer_state, optimizer, seconds: float) -> None:
        """Fold the live LoRA, fresh LoRA + optimizer state, re-extract v, push, evaluate. The row is
        completed in `finish_bake_row`, once this step's metrics are in the log history."""
        k = self.student.n_bakes
        bd = self.rd.path / f"bake_{k:02d}"
        if self.main:
            bd.mkdir(exist_ok=True)
            self.student.save_live(bd / "adapter")
        # every rank bakes the same (seeded fresh LoRA): replicas stay identical
        stages.bake(self.b, bd if self.main else None, seed=self.grpo_args.seed * 1000 + k,
                    event=self.event if self.main else None)
        if optimizer is not None:  # fresh Adam moments for the fresh LoRA (every trainable tensor is live)
            reset_optimizer_state(optimizer)
        sync_master_weights(self.student.live_parameters())  # DeepSpeed ZeRO-1/2: the masters hold the fresh LoRA
        v = stages.extract(self.b)
        self.state.vector, self.state.bake_round = v, k + 1
        if self.scorer.vector is not None:  # trait_projection scores against the current vector
            self.scorer.vector = v
        if not self.main:
            self.engine.sleep()
            return
        v.save(bd / "vector.safetensors")
        res = stages.mfv_eval(self.b, progress=False)
        sc = stages.student_eval(self.b, self.scorer, heldout=self.heldout)
        self.rd.save_json(f"bake_{k:02d}/student.json", sc)
        self.engine.sleep()  # evaluation done: the GPU goes back to training
        row = dict(bake=k, step=trainer_state.global_step, gen_tokens=self.state.gen_tokens, kappa=self.state.kappa,
                   cos_r0=v.cosine(self.v0), seconds=seconds, **stages.carried(self.b, self.v0))
        row.update({x: sc[x] for x in ("trait", "incoherence", "coherence", "verbalisation", "refusal", "tail_nll",
                                       "repetition")})
        row["trait_heldout"] = sc.get("trait_heldout", float("nan"))
        row.update(mfv_columns(res, stages.base_mfv(self.base), self.preset.foundations))
        if res is not None:
            self.rd.save_json(f"bake_{k:02d}/mfv.json", dict(summary=res.summary(), rows=res.rows))
        self.pending_row = row

    def finish_bake_row(self, trainer_state) -> None:
        """Write the pending bake row with the means of the metrics of the steps since the last bake
        (this step's included: on_log runs after on_step_end)."""
        row = self.pending_row
        if row is None or trainer_state.global_step < row["step"]:
            return
        self.pending_row = None
        every = self.cfg.online.bake_every
        hist = [h for h in trainer_state.log_history if row["step"] - every < h.get("step", 0) <= row["step"]]

        def mean(key):
            xs = [h[key] for h in hist if key in h]
            return sum(xs) / len(xs) if xs else None

        row["doses"] = logged_doses(self.rd.path, row["step"] - every, row["step"])
        # what the student trained on since the last bake (counted since this process started: a bake resumed
        # from a checkpoint counts from there), the optimizer steps and their summed learning rate
        trained = self.tr.trained_tokens if self.tr is not None else 0
        row.update(trained_tokens=trained - self._seen["trained"], opt_steps=row["step"] - self._seen["step"],
                   lr_sum=self.lr_sum - self._seen["lr"])
        self._seen = dict(trained=trained, step=row["step"], lr=self.lr_sum)
        row.update(reward=mean("reward"), kl_rmse=mean("kl_rmse"), keep_frac=mean("keep_frac"),
                   **{f"D_{a}": mean(f"kl_{a}") for a in ("mean", "rmse", "p95", "max")},
                   barrier_active_frac=mean("barrier_active_frac"))
        # what the reward gave the advantage, and each loss term's gradient norm (first step of the bake)
        keys = sorted({x for h in hist for x in h if x.startswith(("grad/", "is_ratio/")) or x.endswith("/share")})
        row.update(adv_dose_corr=mean("adv_dose_corr"), groups_zero_sd=mean("groups_zero_sd"),
                   **{x.replace("rewards/", "share_").replace("/share", "").replace("/", "_"): mean(x) for x in keys})
        k = row["bake"]
        self.rd.append_row(row, student_record(k, f"bake_{k:02d}/cumulative", row, row.get("d_trait_nats"), row),
                           columns=BAKE_COLUMNS)
        print("\n" + self.base_line() + "\n" + format_table(self.rd.rows(), columns=BAKE_COLUMNS), flush=True)
        write_bake_report(self.rd.path, self.base.get("mfv"))

    def base_line(self) -> str:
        """The base model's student-side numbers, printed above the bake table for comparison."""
        s, nan = self.base, float("nan")
        return (f"base: s_trait {s.get('trait', nan):+.3f}  s_incoh {s.get('incoherence', nan):.2f}  "
                f"s_coh {s.get('coherence', nan):.2f}  s_verb {s.get('verbalisation', nan):.2f}  "
                f"s_refus {s.get('refusal', nan):.2f}")

    def dump_rank_weights(self) -> None:
        """Each rank's LoRA, history, kappa and student logits on a fixed prompt (multi-process checks)."""
        sd = {n: p.detach().float().cpu().contiguous() for n, p in self.student.model.named_parameters()
              if "lora_" in n}
        for n, (A, B) in self.student.hist.items():
            sd[f"hist.{n}.A"], sd[f"hist.{n}.B"] = A.contiguous(), B.contiguous()
        sd["kappa"] = torch.tensor([float(self.state.kappa)], dtype=torch.float64)  # the dose controller's
        ids = self.tok(render_prompt(self.tok, self.preset.eval_prompts[0]), return_tensors="pt").input_ids
        with torch.no_grad():
            logits = self.student.model(input_ids=ids.to(self.student.model.device)).logits
        sd["student_logits"] = logits[0].float().cpu()
        save_file(sd, str(self.rd.path / f"rank{PartialState().process_index}_weights.safetensors"))

    # ------------------------------------------------------------ trainer
    def dataset(self):
        prompts = self.preset.prompts[:self.cfg.online.seed_prompts or None]
        return Dataset.from_list([{"prompt": [{"role": "user", "content": u}]} for u in prompts])

    def trainer(self) -> SteerHealGRPOTrainer:
        c, a = self.cfg, self.grpo_args
        device = PartialState().device  # this rank's accelerator device (NCCL all-reduces there)
        # a control's dose stays 0; opd's rollouts are the student's own, so their bad rate says nothing
        # about the teacher's dose: no controller for either
        on_policy = c.online.objective == "opd"
        self.controller = None if (c.control or on_policy) else DoseController(self.state, c.steer, self.scorer,
                                                                                lambda xs: global_sums(xs, device))
        which = [x for x in ("trait_" + c.reward.reward_trait, "verbalisation", "incoherence", "refusal")
                 if x != c.reward.reward_ablation]
        timers: dict[str, float] = {}
        steering, system = stages.behaviour(self.b, self.state.steering)
        rollout = make_rollout_func(self.engine, self.student, self.state, a.max_completion_length,
                                    a.temperature, a.top_p, timers, steered=steering is not None and not on_policy,
                                    system=system, live=on_policy, alphas=c.online.rollout_alphas,
                                    log=self.event if self.main else None)
        o = c.online
        kl, obj = KLPenalty.from_config(c.heal), Objective.from_config(o)
        tr = SteerHealGRPOTrainer(model=self.student.model, reward_funcs=make_reward_functions(self.scorer, which),
                                  args=a, train_dataset=self.dataset(), processing_class=self.tok,
                                  student=self.student, kl=kl, objective=obj, controller=self.controller,
                                  rollout_func=rollout, callbacks=[BakeCallback(self)], steer_state=self.state,
                                  scorer=self.scorer, timers=timers, event=self.event if self.main else None,
                                  diag_every=o.grad_norm_every or o.bake_every)
        tr.debug_nan_step = o.debug_nan_step
        self.tr = tr
        for theirs, ours in ((ProgressCallback, StepLine), (PrinterCallback, StepPrinter)):
            if tr.pop_callback(theirs) is not None:
                tr.add_callback(ours)
        return tr
