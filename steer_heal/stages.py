"""The stages every driver calls: the iterative loop (loop.py), the online run (grpo/online.py) and
the comparison (compare.py).

    build      model, preset (+ persona override), student, rollout engine, vignettes
    extract    the persona vector from the baked student
    calibrate  the iso-KL dose, clamped to [kappa_min, kappa_max]
    evaluate   greedy answers to the fixed prompts scored by the shared Scorer, and the MFV forced
               choice; the base model's, once per run directory (base_eval.json)
    bake       fold the live LoRA into the history, save it, push it to the engine, check the push
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from reward.components import Scorer, heldout_scorer, preset_scorer
from steer_heal.chat import encode_prompt, render_prompt
from steer_heal.config import RunConfig, check_control, check_settings
from steer_heal.dose import calibrate_coeff
from steer_heal.engine import HFEngine, RolloutEngine, check_push, make_engine
from steer_heal.engine.base import Rollout
from steer_heal.evals.mfv import MFVResult, evaluate_mfv, trait_nats
from steer_heal.evals.mfv_data import load_vignettes
from steer_heal.evals.student import student_scores
from steer_heal.models import load_model, num_layers
from steer_heal.presets import Preset, defaults_line, load_preset, load_prompt_set
from steer_heal.rundir import RunDir
from steer_heal.steering import Steering, SteeringVector, activation_shift, check_personas, extract_vector, layer_band
from steer_heal.student import Student


@dataclass
class Built:
    """What every stage reads; built once per run (per rank)."""
    cfg: RunConfig
    preset: Preset
    student: Student
    engine: RolloutEngine  # serves the baked student (hf: its own modules; vllm: pushed at each bake)
    layers: list[int]
    mfv_rows: list[dict]

    @property
    def tok(self):
        return self.student.tok

    @property
    def personas(self) -> tuple[str, str]:
        return self.preset.persona_pos, self.preset.persona_neg


def run_preset(cfg: RunConfig) -> Preset:
    """The preset with the config's persona override (its demonstrations act out its own pair, so
    an override drops them)."""
    preset = load_preset(cfg.preset)
    if line := defaults_line(preset):
        print(line, flush=True)
    if not preset.foundations and cfg.eval.mfv:
        print(f"preset '{preset.name}' names no moral foundations (`foundations`): no MFV trait column or verdict; "
              "the MFV answer-mass and prefill columns stay", flush=True)
    if cfg.persona_pos or cfg.persona_neg:
        preset.persona_pos, preset.persona_neg = cfg.persona_pos, cfg.persona_neg
        preset.persona_demos = []
    if cfg.train_prompts:
        preset.prompts = load_prompt_set(cfg.train_prompts, preset)
    check_personas(preset.persona_pos, preset.persona_neg)
    return preset


def build(cfg: RunConfig, engine_seed: int, progress: bool = False, live_seed: int | None = None) -> Built:
    check_settings(cfg)  # every setting against its declaration, before any model loads
    check_control(cfg.control)
    preset = run_preset(cfg)
    m = cfg.model
    lm = load_model(m.model, m.dtype, m.device, m.attn_implementation)
    layers = layer_band(num_layers(lm.model), tuple(cfg.steer.layer_band), cfg.steer.layers)
    h = cfg.heal
    student = Student(lm.model, lm.tokenizer, h.lora_r, h.lora_alpha, h.lora_band, h.target_modules, base_path=lm.path)
    if live_seed is not None:
        student.reset_live(seed=live_seed)  # the same first live LoRA on every rank
    engine = make_engine(cfg.engine, student, lm.tokenizer, layers, cfg.gen.batch_size, cfg.vllm, engine_seed,
                         progress=progress)
    e = cfg.eval
    # subset seed fixed at 0: runs with different seeds are evaluated on the same vignettes
    rows = load_vignettes(e.mfv_dir or None, e.mfv_config, e.mfv_condition, e.mfv_n or None, 0) if e.mfv else []
    return Built(cfg, preset, student, engine, layers, rows)


def behaviour(b: Built, steering: Steering | None) -> tuple[Steering | None, str | None]:
    """What generates a run's training rollouts: (steering, system prompt). Steered runs use the
    steering; the `placebo` control none; `prompt_distil` none, under the positive persona prompt."""
    c = b.cfg.control
    if not c:
        return steering, None
    return None, (b.preset.persona_pos if c == "prompt_distil" else None)


def plain_prompts(b: Built, users: list[str], rollouts: list[Rollout]) -> list[Rollout]:
    """The rollouts with the plain prompt's ids in place of the prompt they were generated under
    (prompt distillation trains, and the scorer reads, the completion after the plain prompt)."""
    plain = [render_prompt(b.tok, u) for u in users]
    return [dataclasses.replace(r, prompt=p, prompt_ids=encode_prompt(b.tok, p)) for p, r in zip(plain, rollouts)]


def scorer(b: Built, vector: SteeringVector | None = None) -> Scorer:
    """The shared scorer (filter, reward, student columns); reference = the original model."""
    return preset_scorer(b.student.model, b.tok, b.preset, b.cfg.reward, ref_ctx=b.student.base,
                         batch_size=b.cfg.gen.batch_size, vector=vector)


# ------------------------------------------------------------------ steering
def extract(b: Built, progress: bool = False) -> SteeringVector:
    """The persona vector of the baked student (live LoRA off)."""
    s = b.cfg.steer
    with b.student.live_off():
        return extract_vector(b.student.model, b.tok, *b.personas, b.preset.contexts[:s.n_contexts], b.layers,
                              s.extract_batch_size, model_id=b.cfg.model.model, progress=progress)


def calibrate(b: Built, v: SteeringVector, event=None, target_kl: float | None = None) -> tuple[float, int]:
    """Iso-KL dose (p95 KL = target_kl on a greedy steered rollout; the config's unless given),
    clamped to [kappa_min, kappa_max]. Returns (kappa, generated tokens)."""
    s = b.cfg.steer
    target = s.target_kl if target_kl is None else target_kl
    prompts = [render_prompt(b.tok, u) for u in b.preset.prompts[:s.calib_prompts]]
    n0 = b.engine.n_generated
    log = (lambda d: event(d.pop("event"), **d)) if event else None
    with b.student.live_off():
        c, k = calibrate_coeff(b.student.model, b.tok, b.engine, v, prompts, target, s.calib_tokens,
                               steps=s.calib_steps, log=log)
    tokens = b.engine.n_generated - n0
    if event:  # the rank that writes also prints
        event("calibrated", coeff=c, p95_kl=k, target=target, gen_tokens=tokens)
        print(f"  iso-KL calibration: c*={c:.3g} (p95 KL {k:.2f} nats, target {target})", flush=True)
    if c > s.kappa_max and event:
        print(f"warning: iso-KL calibration found c*={c:.3g} above kappa_max={s.kappa_max}; steering at "
              f"{s.kappa_max} (raise kappa_max to use c*)", flush=True)
        event("kappa_clamped", coeff=c, kappa_max=s.kappa_max)
    return min(s.kappa_max, max(s.kappa_min, c)), tokens


def starting_dose(b: Built, v: SteeringVector, event=None) -> tuple[float, int]:
    """The configured kappa, or (kappa: 0) the calibrated one. Returns (kappa, generated tokens)."""
    if b.cfg.steer.kappa:
        return b.cfg.steer.kappa, 0
    return calibrate(b, v, event)


# ------------------------------------------------------------------ evaluation
def heldout(b: Built) -> Scorer | None:
    """The held-out trait judge (the preset's eval persona pair), or None for a preset without one."""
    p = b.preset
    if not (p.eval_persona_pos and p.eval_persona_neg):
        return None
    return heldout_scorer(b.student.model, b.tok, p, ref_ctx=b.student.base, batch_size=b.cfg.gen.batch_size)


def student_eval(b: Built, sc: Scorer, steering: Steering | None = None, base: bool = False,
                 desc: str | None = None, heldout: Scorer | None = None) -> dict:
    """Greedy answers to the preset's fixed prompts of the base, the steered or the baked student."""
    e = b.cfg.eval
    users = b.preset.split(e.split)[:e.eval_prompts]
    if base:
        # an engine with its own weight copy holds the base model only before the first bake
        eng = b.engine if b.student.n_bakes == 0 else HFEngine(b.student.model, b.tok, b.cfg.gen.batch_size)
        with b.student.base():
            return student_scores(eng, sc, users, None, e.eval_max_new_tokens, desc=desc, heldout=heldout)
    with b.student.live_off():
        return student_scores(b.engine, sc, users, steering, e.eval_max_new_tokens, desc=desc, heldout=heldout)


def carried(b: Built, v0: SteeringVector) -> dict:
    """The baked student's mean activation shift from base on the run's held-out prompts, against the
    round-0 vector (the teacher's): shift_cos, shift_dose (steering/extract.activation_shift)."""
    users = b.preset.split(b.cfg.eval.split)
    prompts = [render_prompt(b.tok, u) for u in users]
    return activation_shift(b.student.model, b.tok, prompts, v0, b.student.live_off, b.student.base,
                            b.cfg.steer.extract_batch_size)


def mfv_eval(b: Built, steering: Steering | None = None, base: bool = False,
             progress: bool = True) -> MFVResult | None:
    """Moral-foundations forced choice on the base, the steered or the baked student."""
    if not b.mfv_rows:
        return None
    e = b.cfg.eval
    with (b.student.base() if base else b.student.live_off()):
        return evaluate_mfv(b.student.model, b.tok, b.mfv_rows, e.think_tokens, e.mfv_batch_size, steering,
                            progress=progress, read=e.mfv_read)


def base_eval(b: Built, rd: RunDir, sc: Scorer, progress: bool = True, heldout: Scorer | None = None) -> dict:
    """The base model's student scores and MFV summary, computed once per run directory
    (base_eval.json; a resumed run reads it back)."""
    out = rd.load_json("base_eval.json")
    if out is not None:
        return out
    out = student_eval(b, sc, base=True, desc="generate" if progress else None, heldout=heldout)
    res = mfv_eval(b, base=True, progress=progress)
    if res is not None:
        out["mfv"] = res.summary() | {"profile": res.profile, "human_profile": res.human_profile,
                                      "trait_nats": trait_nats(res, b.preset.foundations)}
        rd.save_json("base_mfv_rows.json", res.rows)
    rd.save_json("base_eval.json", out)
    return out


def base_mfv(base: dict) -> MFVResult | None:
    return MFVResult.from_summary(base["mfv"]) if "mfv" in base else None


# ------------------------------------------------------------------ bake
def bake(b: Built, out: Path | None, seed: int | None = None, event=None) -> None:
    """Fold the live LoRA into the history (fresh live LoRA, from `seed` when given), save the
    cumulative adapter to out/cumulative, push the baked weights to the engine and check the push.
    Every rank calls it; only the rank that writes passes `out` (and `event`)."""
    b.student.bake(seed=seed)
    if out is not None:
        b.student.save_cumulative(Path(out) / "cumulative")
    b.engine.push(b.student)  # vLLM: load the baked layers in place (HF serves the student itself)
    if event is not None and not isinstance(b.engine, HFEngine):
        event("engine_push", bakes=b.student.n_bakes, **check_push(b.engine, b.student, b.preset.eval_prompts[:4]))
