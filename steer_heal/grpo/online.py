"""The online run: steered GRPO with periodic bakes, an online dose controller and a bake table.

    student = original weights + baked history + live LoRA (updated every batch by GRPO)
    engine  = serves the baked student + kappa * v (never the live LoRA)
    every `bake_every` steps: fold the live LoRA into the history, fresh LoRA + optimizer state,
    re-extract v, push to the engine, MFV evaluation, save the bake's adapter + vector, one table row.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from reward.components import RewardConfig, Scorer, preset_scorer
from reward.trl_rewards import make_reward_functions
from steer_heal.grpo.rollout import SteerState, global_sums, make_rollout_func
from steer_heal.rundir import RunDir, write_atomic


@dataclass
class OnlineConfig:
    """Script arguments of recipes/grpo_heal.py (the GRPO knobs live in trl.GRPOConfig)."""
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    dtype: str = "auto"
    preset: str = "care-over-authority"
    persona_pos: str = ""
    persona_neg: str = ""
    run_dir: str = ""
    seed_prompts: int = 0  # 0: all the preset's generation prompts
    # rollout engine: hf | vllm (colocated; sized by trl's vllm_gpu_memory_utilization,
    # vllm_enable_sleep_mode and vllm_max_model_length; keep use_vllm false: rollouts come from here)
    engine: str = "hf"
    vllm_enforce_eager: str = "auto"  # auto: compiled + CUDA graphs on GPU, eager on CPU
    # steering
    layer_band: list[float] = field(default_factory=lambda: [0.45, 0.55])
    n_contexts: int = 64
    kappa: float = 0.0  # 0: iso-KL calibration at the start
    target_kl: float = 1.0
    kappa_min: float = 0.05
    kappa_max: float = 8.0
    # online dose controller (walk-C analogue): bad = incoherent or verbalising completions
    dose_band: list[float] = field(default_factory=lambda: [0.05, 0.25])  # bad-rate band
    dose_down: float = 0.8  # kappa *= this when the bad rate is over the band
    dose_up: float = 1.05  # kappa *= this when it is under the band
    # objective of the live-LoRA update (see steer_heal/grpo/trainer.py)
    objective: str = "nll"  # grpo | nll | grpo+nll | kd
    w_pg: float = 1.0  # grpo+nll: weight of TRL's policy loss
    w_nll: float = 1.0  # grpo+nll: weight of the filtered NLL
    fused: bool = True  # one student forward per micro-batch (False: TRL's forward + a second one; for the bench)
    # heal
    bake_every: int = 4
    budget_tokens: int = 0  # stop at the first bake whose generated tokens (rollouts, calibration) reach this
    kl_beta: float = 0.3
    kl_tau: float = 0.5
    kl_agg: str = "rmse"
    kl_reference: str = "prev"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_band: list[float] = field(default_factory=lambda: [0.2, 0.8])
    # reward
    reward_trait: str = "llr"
    w_trait: float = 1.0
    w_verb: float = 1.0
    w_incoh: float = 0.25
    w_refusal: float = 1.0
    reward_ablation: str = ""  # drop one component: trait_llr | verbalisation | incoherence | refusal
    incoherence: str = "tail"  # tail | collapse: tail NLL minus the reply's mean NLL (does not penalise the trait)
    # evaluation at each bake
    eval_prompts: int = 8  # the preset's fixed prompts answered greedily by the unsteered student
    eval_max_new_tokens: int = 48
    mfv: bool = True
    mfv_dir: str = ""
    mfv_n: int = 28
    think_tokens: int = 32
    mfv_batch_size: int = 28
    mfv_read: str = "tinymfv"  # tinymfv: its exact numbers; exact: every think token, every real token (README)
    dump_rank_weights: bool = False  # each rank writes its LoRA + history at the end (multi-process checks)
    stop_after_step: int = 0  # exit (code 3) right after this step's checkpoint: simulates a killed run

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        d = self.to_dict()
        for k in ("run_dir", "stop_after_step", "dump_rank_weights"):  # where/how, not what
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class DoseController:
    """Lowers kappa when the batch's bad rate (incoherent or verbalising) is over the band, raises it
    slowly when under; fed by the reward functions, so it sees exactly what the reward saw."""

    def __init__(self, state: SteerState, cfg: OnlineConfig, scorer: Scorer):
        self.state, self.cfg, self.scorer = state, cfg, scorer
        self.last_rate = float("nan")

    def observe(self, comp: dict) -> None:
        c = self.scorer.cfg
        coherent = self.scorer.coherent(comp)
        bad = [not ok or v > c.max_verbalisation for ok, v in zip(coherent, comp["verbalisation"])]
        device = next(self.scorer.model.parameters()).device
        # every rank sees the global rate, so kappa stays identical across ranks
        n_bad, n = global_sums([sum(bad), len(bad)], device)
        self.last_rate = n_bad / max(n, 1.0)
        lo, hi = self.cfg.dose_band
        k = self.state.kappa
        if self.last_rate > hi:
            k *= self.cfg.dose_down
        elif self.last_rate < lo:
            k *= self.cfg.dose_up
        self.state.kappa = min(self.cfg.kappa_max, max(self.cfg.kappa_min, k))


BAKE_COLUMNS = [("bake", "bake", "{:d}"), ("step", "step", "{:d}"), ("gen_tokens", "gen_tok", "{:d}"),
                ("kappa", "kappa", "{:.3g}"), ("cos_r0", "cos_r0", "{:.3f}"), ("reward", "reward", "{:+.3f}"),
                ("keep_frac", "keep", "{:.2f}"), ("kl_rmse", "kl_rmse", "{:.3f}"),
                ("trait", "s_trait", "{:+.3f}"), ("incoherence", "s_incoh", "{:.2f}"),
                ("coherence", "s_coh", "{:.2f}"), ("verbalisation", "s_verb", "{:.2f}"),
                ("refusal", "s_refus", "{:.2f}"),
                ("trait_nats", "trait_nats", "{:+.2f}"), ("d_trait_nats", "d_tnats", "{:+.2f}"),
                ("pmass", "pmass", "{:.3f}"), ("nll_prefill", "nll_pre", "{:.2f}"), ("unscorable", "unsc", "{:.2f}"),
                ("surgical", "surgical", "{}"), ("seconds", "sec", "{:.0f}")]


class BakeCallback(TrainerCallback):
    """Every `bake_every` optimizer steps: bake, refresh, evaluate, record. Also saves and restores
    steer-heal state with TRL checkpoints."""

    def __init__(self, run: "OnlineRun"):
        self.run = run
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        if state.global_step % self.run.cfg.bake_every == 0:
            self.run.bake(state, optimizer, time.perf_counter() - self.t0)
            self.t0 = time.perf_counter()
            control.should_log = True  # this step's metrics are logged now; the row is written in on_log
            budget = self.run.cfg.budget_tokens
            if budget and self.run.state.gen_tokens >= budget:  # a bake boundary at or past the budget
                control.should_training_stop = True
                control.should_save = True

    def on_log(self, args, state, control, logs=None, **kw):
        self.run.finish_bake_row(state)

    def on_save(self, args, state, control, **kw):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.exists():
            self.run.save_state(ckpt / "steer_heal_state")
        stop = self.run.cfg.stop_after_step
        if stop and state.global_step >= stop:
            raise SystemExit(3)


class OnlineRun:
    """Holds the student, the engine, the steering state and the run directory of an online run."""

    def __init__(self, cfg: OnlineConfig, grpo_args, seed: int = 42):
        from steer_heal.evals.mfv_data import load_vignettes
        from steer_heal.models import load_model, num_layers
        from steer_heal.presets import load_preset
        from steer_heal.steering import check_personas, layer_band
        from steer_heal.student import Student

        from accelerate import PartialState

        self.cfg, self.grpo_args = cfg, grpo_args
        check_online_config(cfg, grpo_args)
        self.main = PartialState().is_main_process  # only rank 0 writes, evaluates and prints
        self.preset = load_preset(cfg.preset)
        if cfg.persona_pos or cfg.persona_neg:
            self.preset.persona_pos, self.preset.persona_neg = cfg.persona_pos, cfg.persona_neg
            self.preset.persona_demos = []  # the preset's demonstrations act out its own pair
        check_personas(self.preset.persona_pos, self.preset.persona_neg)
        lm = load_model(cfg.model, dtype=cfg.dtype)
        self.layers = layer_band(num_layers(lm.model), tuple(cfg.layer_band))
        self.rd = RunDir(cfg.run_dir or grpo_args.output_dir, cfg, resume=True, rows_file="bakes.jsonl",
                         table_file="bake_table.md", write=self.main)
        self.student = Student(lm.model, lm.tokenizer, cfg.lora_r, cfg.lora_alpha, tuple(cfg.lora_band),
                               base_path=lm.path)
        self.student.reset_live(seed=seed * 1000 - 1)  # the first live LoRA is the same on every rank
        self.tok = lm.tokenizer
        self.engine = self._engine(lm.tokenizer, seed)
        self.mfv_rows = load_vignettes(cfg.mfv_dir or None, n=cfg.mfv_n or None, seed=0) if cfg.mfv else []
        self.base_mfv = None
        self.v0 = None
        self.state: SteerState | None = None
        self.reward_cfg = RewardConfig(trait=cfg.reward_trait, w_trait=cfg.w_trait, w_verb=cfg.w_verb,
                                       w_incoh=cfg.w_incoh, w_refusal=cfg.w_refusal, incoherence=cfg.incoherence)
        self.pending_row: dict | None = None  # a bake's row, completed with its step's logs in on_log
        self.base_student: dict | None = None

    def _engine(self, tok, seed: int):
        from steer_heal.engine import VLLMConfig, make_engine

        a = self.grpo_args
        if getattr(a, "use_vllm", False):
            raise ValueError("use_vllm=true would make TRL build its own unsteered vLLM; fix: set use_vllm: false "
                             "and engine: vllm (the steered engine serves the rollouts)")
        eager = {"auto": None, "true": True, "false": False}[str(self.cfg.vllm_enforce_eager).lower()]
        vc = VLLMConfig(gpu_memory_utilization=a.vllm_gpu_memory_utilization, enforce_eager=eager,
                        sleep=a.vllm_enable_sleep_mode, max_model_len=a.vllm_max_model_length or 2048)
        from accelerate import PartialState

        # each rank samples its own prompts: a distinct engine seed per rank
        return make_engine(self.cfg.engine, self.student, tok, self.layers, 64, vc, seed + PartialState().process_index)

    @property
    def personas(self) -> tuple[str, str]:
        return self.preset.persona_pos, self.preset.persona_neg

    # ------------------------------------------------------------ stages
    def extract(self):
        from steer_heal.steering import extract_vector

        with self.student.live_off():
            return extract_vector(self.student.model, self.tok, *self.personas, self.preset.contexts[:self.cfg.n_contexts],
                                  self.layers, model_id=self.cfg.model)

    def calibrate(self, v) -> tuple[float, int]:
        from steer_heal.chat import render_prompt
        from steer_heal.steering.calibrate import calibrate_coeff

        prompts = [render_prompt(self.tok, u) for u in self.preset.prompts[:4]]
        n0 = self.engine.n_generated
        with self.student.live_off():
            c, k = calibrate_coeff(self.student.model, self.tok, self.engine, v, prompts, self.cfg.target_kl, 16, steps=3)
        tokens = self.engine.n_generated - n0
        if self.main:
            self.rd.event("calibrated", coeff=c, p95_kl=k, gen_tokens=tokens)
        if c > self.cfg.kappa_max:  # setup clamps kappa to [kappa_min, kappa_max]: say so once
            print(f"warning: iso-KL calibration found c*={c:.3g} above kappa_max={self.cfg.kappa_max}; steering at "
                  f"{self.cfg.kappa_max} (raise kappa_max to use c*)", flush=True)
            if self.main:
                self.rd.event("kappa_clamped", coeff=c, kappa_max=self.cfg.kappa_max)
        return c, tokens

    def evaluate(self, base: bool = False):
        from steer_heal.evals.mfv import evaluate_mfv

        if not self.mfv_rows or not self.main:
            return None
        ctx = self.student.base() if base else self.student.live_off()
        with ctx:
            return evaluate_mfv(self.student.model, self.tok, self.mfv_rows, self.cfg.think_tokens,
                                self.cfg.mfv_batch_size, None, progress=False, read=self.cfg.mfv_read)

    def setup(self, resume_from: str | None = None):
        """Vector, kappa, base evaluation; or the state saved in a TRL checkpoint."""
        from steer_heal.evals.mfv import MFVResult
        from steer_heal.steering import SteeringVector

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
                self.rd.event("resume", checkpoint=str(resume_from), step=step, bakes=meta["n_bakes"])
        else:
            if self.main and self.rd.rows():
                from steer_heal.rundir import RunDirError

                raise RunDirError(f"run directory '{self.rd.path}' already holds bakes; fix: pass "
                                  "--resume_from_checkpoint <its checkpoint> or a new --output_dir")
            v = self.extract()
            kappa, calib_tokens = (self.cfg.kappa, 0) if self.cfg.kappa else self.calibrate(v)
            kappa = min(self.cfg.kappa_max, max(self.cfg.kappa_min, kappa))  # the dose controller's range
            self.state = SteerState(v, kappa, 0, calib_tokens)
        self.v0 = SteeringVector.load(self.v0_path) if self.v0_path.exists() else self.state.vector
        if self.main and not self.v0_path.exists():
            self.v0.save(self.v0_path)
        base = self.rd.load_json("base_mfv.json")
        if base is None and self.mfv_rows and self.main:
            res = self.evaluate(base=True)
            base = res.summary()
            self.rd.save_json("base_mfv.json", base)
        self.base_mfv = MFVResult.from_summary(base) if base else None
        self.scorer = preset_scorer(self.student.model, self.tok, self.preset, self.reward_cfg, ref_ctx=self.student.base,
                                    vector=self.state.vector if self.cfg.reward_trait == "projection" else None)
        self.base_student = self.rd.load_json("base_student.json")
        if self.base_student is None and self.main:
            from steer_heal.engine import HFEngine

            # an engine with its own weight copy holds the base only before the first bake
            eng = self.engine if self.student.n_bakes == 0 else HFEngine(self.student.model, self.tok)
            with self.student.base():
                self.base_student = self.student_scores(eng)
            self.rd.save_json("base_student.json", self.base_student)

    def student_scores(self, engine=None) -> dict:
        """The unsteered student's greedy answers to the preset's eval prompts, scored by the shared
        Scorer (the iterative round table's student columns); the caller sets the student's mode."""
        from steer_heal.evals.student import student_scores

        users = self.preset.eval_prompts[:self.cfg.eval_prompts]
        return student_scores(engine or self.engine, self.scorer, users, None, self.cfg.eval_max_new_tokens)

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
        from steer_heal.evals.mfv import mfv_columns

        k = self.student.n_bakes
        bd = self.rd.path / f"bake_{k:02d}"
        if self.main:
            bd.mkdir(exist_ok=True)
            self.student.save_live(bd / "adapter")
        self.student.bake(seed=self.grpo_args.seed * 1000 + k)  # every rank bakes the same: replicas stay identical
        if self.main:
            self.student.save_cumulative(bd / "cumulative")
        if optimizer is not None:  # the fresh LoRA starts with fresh Adam moments
            for p in self.student.live_parameters():
                optimizer.state.pop(p, None)
        v = self.extract()
        self.state.vector, self.state.bake_round = v, k + 1
        if self.scorer.vector is not None:  # trait_projection scores against the current vector
            self.scorer.vector = v
        self.engine.push(self.student)
        if not self.main:
            return
        from steer_heal.engine import check_push

        self.rd.event("engine_push", bakes=self.student.n_bakes,
                      **check_push(self.engine, self.student, self.preset.eval_prompts[:4]))
        v.save(bd / "vector.safetensors")
        res = self.evaluate()
        with self.student.live_off():
            sc = self.student_scores()
        self.rd.save_json(f"bake_{k:02d}/student.json", sc)
        row = dict(bake=k, step=trainer_state.global_step, gen_tokens=self.state.gen_tokens, kappa=self.state.kappa,
                   cos_r0=v.cosine(self.v0), seconds=seconds)
        row.update({x: sc[x] for x in ("trait", "incoherence", "coherence", "verbalisation", "refusal", "tail_nll")})
        row.update(mfv_columns(res, self.base_mfv, self.preset.foundations))
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
        hist = [h for h in trainer_state.log_history
                if row["step"] - self.cfg.bake_every < h.get("step", 0) <= row["step"]]

        def mean(key):
            xs = [h[key] for h in hist if key in h]
            return sum(xs) / len(xs) if xs else None

        row.update(reward=mean("reward"), kl_rmse=mean("kl_rmse"), keep_frac=mean("keep_frac"))
        self.rd.append_row(row, columns=BAKE_COLUMNS)
        from steer_heal.rundir import format_table

        print("\n" + self.base_line() + "\n" + format_table(self.rd.rows(), columns=BAKE_COLUMNS), flush=True)
        from steer_heal.evals.mfv import trait_nats
        from steer_heal.report import write_bake_report

        b = self.base_mfv
        write_bake_report(self.rd.path, None if b is None else dict(b.summary(), trait_nats=trait_nats(b, self.preset.foundations)))

    def base_line(self) -> str:
        """The base model's student-side numbers, printed above the bake table for comparison."""
        s = self.base_student or {}
        return (f"base: s_trait {s.get('trait', float('nan')):+.3f}  s_incoh {s.get('incoherence', float('nan')):.2f}  "
                f"s_coh {s.get('coherence', float('nan')):.2f}  s_verb {s.get('verbalisation', float('nan')):.2f}  "
                f"s_refus {s.get('refusal', float('nan')):.2f}")

    def dump_rank_weights(self) -> None:
        from accelerate import PartialState
        from safetensors.torch import save_file

        sd = {n: p.detach().float().cpu().contiguous() for n, p in self.student.model.named_parameters() if "lora_" in n}
        for n, (A, B) in self.student.hist.items():
            sd[f"hist.{n}.A"], sd[f"hist.{n}.B"] = A.contiguous(), B.contiguous()
        save_file(sd, str(self.rd.path / f"rank{PartialState().process_index}_weights.safetensors"))

    # ------------------------------------------------------------ trainer
    def dataset(self):
        from datasets import Dataset

        prompts = self.preset.prompts[:self.cfg.seed_prompts or None]
        return Dataset.from_list([{"prompt": [{"role": "user", "content": u}]} for u in prompts])

    def trainer(self):
        from steer_heal.grpo.trainer import KLPenalty, Objective, SteerHealGRPOTrainer

        self.controller = DoseController(self.state, self.cfg, self.scorer)
        which = [c for c in ("trait_" + self.cfg.reward_trait, "verbalisation", "incoherence", "refusal")
                 if c != self.cfg.reward_ablation]
        a = self.grpo_args
        timers: dict[str, float] = {}
        rollout = make_rollout_func(self.engine, self.student, self.state, a.max_completion_length,
                                    a.temperature, a.top_p, timers)
        kl = KLPenalty(self.cfg.kl_beta, self.cfg.kl_tau, self.cfg.kl_agg, self.cfg.kl_reference)
        obj = Objective(self.cfg.objective, self.cfg.w_pg, self.cfg.w_nll, self.cfg.fused)
        tr = SteerHealGRPOTrainer(model=self.student.model, reward_funcs=make_reward_functions(self.scorer, which),
                                  args=a, train_dataset=self.dataset(), processing_class=self.tok,
                                  student=self.student, kl=kl, objective=obj, controller=self.controller,
                                  rollout_func=rollout, callbacks=[BakeCallback(self)])
        tr.steer_state, tr.timers, tr.scorer = self.state, timers, self.scorer
        return tr


REWARD_TRAITS = ("llr", "projection")
ABLATIONS = ("", "trait_llr", "trait_projection", "verbalisation", "incoherence", "refusal")


def check_online_config(cfg: OnlineConfig, grpo_args) -> None:
    """One-line refusals, before any model is loaded."""
    from steer_heal.grpo.trainer import OnlineConfigError, check_online_args

    if cfg.reward_trait not in REWARD_TRAITS:
        hint = (" (the judge needs a second chat model that the online recipe does not build)"
                if cfg.reward_trait == "judge" else "")
        raise OnlineConfigError(f"reward_trait '{cfg.reward_trait}' is not available online{hint}; fix: "
                                f"reward_trait: llr or projection")
    if cfg.reward_ablation not in ABLATIONS:
        raise OnlineConfigError(f"unknown reward_ablation '{cfg.reward_ablation}'; fix: one of {ABLATIONS[1:]}")
    check_online_args(grpo_args, cfg.objective)
