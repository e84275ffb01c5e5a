"""The iterative loop: extract -> walk-C generate + filter -> steered eval -> heal -> bake -> healed eval."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from reward.components import Scorer, preset_scorer
from steer_heal.chat import render_prompt
from steer_heal.config import RunConfig
from steer_heal.engine import HFEngine, RolloutEngine, Sampling, check_push, make_engine
from steer_heal.evals.mfv import MFVResult, evaluate_mfv, mfv_columns, trait_nats
from steer_heal.evals.mfv_data import load_vignettes
from steer_heal.evals.student import student_scores
from steer_heal.heal import HealDivergedError, heal_round
from steer_heal.models import load_model, num_layers
from steer_heal.presets import Preset, load_preset
from steer_heal.rundir import RunDir, format_table
from steer_heal.steering import Steering, SteeringVector, check_personas, extract_vector, layer_band
from steer_heal.steering.calibrate import calibrate_coeff
from steer_heal.student import Student
from steer_heal.tracking import Tracker


class FilterEmptyError(RuntimeError):
    """The filter kept too few completions to train on."""


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Ctx:
    """What every stage needs; built once per run."""
    cfg: RunConfig
    rd: RunDir
    preset: Preset
    student: Student
    engine: RolloutEngine  # serves the baked student (hf: its own modules; vllm: pushed at each bake)
    layers: list[int]
    tracker: Tracker
    mfv_rows: list[dict]

    @property
    def personas(self) -> tuple[str, str]:
        return self.preset.persona_pos, self.preset.persona_neg

    def log(self, kind: str, **kw) -> None:
        self.rd.event(kind, **kw)


# ------------------------------------------------------------------ stages
def extract(ctx: Ctx, r: int) -> SteeringVector:
    with ctx.student.live_off():
        v = extract_vector(ctx.student.model, ctx.student.tok, *ctx.personas,
                           ctx.preset.contexts[:ctx.cfg.steer.n_contexts], ctx.layers, ctx.cfg.steer.batch_size,
                           model_id=ctx.cfg.model.model, progress=True)
    v.save(ctx.rd.round_dir(r) / "vector.safetensors")
    return v


SCORED = ["trait_llr", "incoherence", "verbalisation", "refusal"]
FILTERED = ["incoherence", "verbalisation", "refusal"]  # what Scorer.keep reads


def scorer(ctx: Ctx) -> Scorer:
    """The shared scorer (the online reward uses the same one), reference = the original model."""
    return preset_scorer(ctx.student.model, ctx.student.tok, ctx.preset, ctx.cfg.reward, ref_ctx=ctx.student.base,
                         batch_size=ctx.cfg.gen.batch_size)


def generate_scored(ctx: Ctx, users: list[str], steering: Steering | None, seed: int, greedy: bool = False,
                    max_new_tokens: int | None = None, which: list[str] = SCORED, engine=None):
    """Generate from the baked student (steered) and score under the base model."""
    g = ctx.cfg.gen
    samp = Sampling(max_new_tokens=max_new_tokens or g.max_new_tokens, temperature=0.0 if greedy else g.temperature,
                    top_p=g.top_p, seed=seed)
    prompts = [render_prompt(ctx.student.tok, u) for u in users]
    with ctx.student.live_off():
        ro = (engine or ctx.engine).generate(prompts, steering, samp, logprobs=False, desc="generate")
        comp = scorer(ctx).components(users, [r.completion_ids for r in ro], [r.text for r in ro],
                                      prompt_ids=[r.prompt_ids for r in ro], which=which)
    return ro, comp


def walk_c(ctx: Ctx, v: SteeringVector, kappa: float, r: int) -> float:
    """Lower kappa (log bisection toward kappa_min) until a probe batch passes at the target rate."""
    s, lo = ctx.cfg.steer, ctx.cfg.steer.kappa_min
    rng = random.Random(ctx.cfg.seed * 7 + r)
    for step in range(s.walk_max_steps):
        users = rng.sample(ctx.preset.prompts, min(s.n_probe, len(ctx.preset.prompts)))
        _, sc = generate_scored(ctx, users, Steering(v, kappa), seed=ctx.cfg.seed + 100 * r + step,
                                which=FILTERED)
        rate = sum(scorer(ctx).keep(sc)) / max(len(users), 1)
        ctx.log("walk_c", round=r, step=step, kappa=kappa, pass_rate=rate)
        if rate >= s.walk_target_rate or kappa <= lo * 1.0001:
            break
        kappa = max(lo, math.sqrt(lo * kappa))
    return kappa


def collect(ctx: Ctx, v: SteeringVector, kappa: float, r: int):
    """Generate at each dose alpha * kappa, score, filter; log the per-dose table and borderline samples."""
    rng = random.Random(ctx.cfg.seed * 13 + r)
    rows, dose = [], []
    for ai, alpha in enumerate(ctx.cfg.steer.alphas):
        users = [rng.choice(ctx.preset.prompts) for _ in range(ctx.cfg.gen.n_per_alpha)]
        ro, sc = generate_scored(ctx, users, Steering(v, alpha * kappa), seed=ctx.cfg.seed + 1000 * r + ai)
        keep = scorer(ctx).keep(sc)
        for i, (u, ro_, k) in enumerate(zip(users, ro, keep)):
            rows.append(dict(alpha=alpha, user=u, text=ro_.text, kept=k, **{n: v[i] for n, v in sc.items()}, _ro=ro_))
        finite = [t for t in sc["tail_nll"] if math.isfinite(t)]
        dose.append(dict(alpha=alpha, coeff=alpha * kappa, n=len(users), kept_frac=sum(keep) / max(len(keep), 1),
                         tail_nll=sum(finite) / max(len(finite), 1)))
    ctx.log("dose_table", round=r, rows=dose)
    print(f"  dose table r{r}: " + "  ".join(f"a={d['alpha']:.2f} c={d['coeff']:.3g} tailnll={d['tail_nll']:.2f} "
                                            f"kept={d['kept_frac']:.2f} n={d['n']}" for d in dose))
    # borderline: kept with the worst tail NLL, dropped with the best
    kept = sorted([x for x in rows if x["kept"]], key=lambda x: -x["tail_nll"])[:2]
    drop = sorted([x for x in rows if not x["kept"]], key=lambda x: x["tail_nll"])[:2]
    for tag, xs in (("kept", kept), ("dropped", drop)):
        for x in xs:
            ctx.log("borderline", round=r, which=tag, tail_nll=x["tail_nll"], repetition=x["repetition"],
                    verbalisation=x["verbalisation"], text=x["text"][:300])
    with open(ctx.rd.round_dir(r) / "samples.jsonl", "w") as f:
        import json
        for x in rows:
            f.write(json.dumps({k: v for k, v in x.items() if k != "_ro"}) + "\n")
    return rows


def evaluate_fixed(ctx: Ctx, steering: Steering | None, base: bool = False) -> dict:
    """Greedy answers to the preset's fixed prompts, scored by the shared Scorer."""
    users = ctx.preset.eval_prompts[:ctx.cfg.eval.n_prompts]
    n_tok = ctx.cfg.eval.max_new_tokens
    if base:
        # an engine with its own weight copy holds the base model only before the first bake
        eng = ctx.engine if ctx.student.n_bakes == 0 else HFEngine(ctx.student.model, ctx.student.tok, ctx.cfg.gen.batch_size)
        with ctx.student.base():
            return student_scores(eng, scorer(ctx), users, None, n_tok, desc="generate")
    with ctx.student.live_off():
        return student_scores(ctx.engine, scorer(ctx), users, steering, n_tok, desc="generate")


def mfv(ctx: Ctx, steering: Steering | None, base: bool = False) -> MFVResult | None:
    """Moral-foundations forced choice on the base, the steered or the healed student."""
    if not ctx.mfv_rows:
        return None
    e = ctx.cfg.eval
    with (ctx.student.base() if base else ctx.student.live_off()):
        return evaluate_mfv(ctx.student.model, ctx.student.tok, ctx.mfv_rows, e.think_tokens, e.mfv_batch_size, steering,
                            read=e.mfv_read)


def heal(ctx: Ctx, kept: list[dict], r: int):
    examples = [(x["_ro"].prompt_ids, x["_ro"].completion_ids) for x in kept]
    log_fn = lambda row: (ctx.log("heal_step", **row), ctx.tracker.log({f"heal/{k}": v for k, v in row.items()}))  # noqa: E731
    res = heal_round(ctx.student, examples, ctx.cfg.heal, round_idx=r, seed=ctx.cfg.seed + r, log_fn=log_fn)
    ctx.student.save_live(ctx.rd.round_dir(r) / "adapter")
    return res


def bake(ctx: Ctx, r: int) -> None:
    ctx.student.bake()
    ctx.student.save_cumulative(ctx.rd.round_dir(r) / "cumulative")
    ctx.engine.push(ctx.student)  # vLLM: load the baked layers in place (HF serves the student itself)
    if not isinstance(ctx.engine, HFEngine):
        ctx.log("engine_push", round=r, bakes=ctx.student.n_bakes,
                **check_push(ctx.engine, ctx.student, ctx.preset.eval_prompts[:4]))


# ------------------------------------------------------------------ main loop
def build(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> Ctx:
    preset = load_preset(cfg.preset)
    if cfg.persona_pos or cfg.persona_neg:
        preset.persona_pos, preset.persona_neg = cfg.persona_pos, cfg.persona_neg
        preset.persona_demos = []  # the preset's demonstrations act out its own pair, not this one
    check_personas(preset.persona_pos, preset.persona_neg)
    lm = load_model(cfg.model.model, cfg.model.dtype, cfg.model.device, cfg.model.attn_implementation)
    layers = layer_band(num_layers(lm.model), tuple(cfg.steer.layer_band), cfg.steer.layers)
    rd = RunDir(run_dir, cfg, resume=resume)
    h = cfg.heal
    student = Student(lm.model, lm.tokenizer, h.lora_r, h.lora_alpha, h.lora_band, h.target_modules, base_path=lm.path)
    engine = make_engine(cfg.engine, student, lm.tokenizer, layers, cfg.gen.batch_size, cfg.vllm, cfg.seed, progress=True)
    e = cfg.eval
    # subset seed fixed at 0: runs with different seeds are evaluated on the same vignettes
    rows = load_vignettes(e.mfv_dir or None, e.mfv_config, e.mfv_condition, e.mfv_n or None, 0) if e.mfv else []
    return Ctx(cfg, rd, preset, student, engine, layers, Tracker(cfg.report_to, rd.path, cfg.to_dict()), rows)


def run(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> list[dict]:
    ctx = build(cfg, run_dir, resume)
    rows = ctx.rd.rows()
    start = len(rows)
    if start:  # resume: rebuild the baked student from the last completed round's cumulative adapter
        ctx.student.load_cumulative(ctx.rd.round_dir(start - 1) / "cumulative")
        ctx.engine.push(ctx.student)
        ctx.log("resume", from_round=start)
    base_eval = ctx.rd.load_json("base_eval.json")
    if base_eval is None:
        base_eval = evaluate_fixed(ctx, None, base=True)
        base_mfv = mfv(ctx, None, base=True)
        if base_mfv is not None:
            base_eval["mfv"] = base_mfv.summary() | {"profile": base_mfv.profile, "human_profile": base_mfv.human_profile,
                                                     "trait_nats": trait_nats(base_mfv, ctx.preset.foundations)}
            ctx.rd.save_json("base_mfv_rows.json", base_mfv.rows)
        ctx.rd.save_json("base_eval.json", base_eval)
    base_mfv = MFVResult.from_summary(base_eval["mfv"]) if "mfv" in base_eval else None
    kappa = rows[-1]["kappa"] if rows else None
    gen_tokens = rows[-1].get("gen_tokens", 0) if rows else 0
    v0 = SteeringVector.load(ctx.rd.round_dir(0) / "vector.safetensors") if start else None
    for r in range(start, cfg.rounds):
        if cfg.budget_tokens and gen_tokens >= cfg.budget_tokens:
            ctx.log("stop_budget", round=r, gen_tokens=gen_tokens, budget=cfg.budget_tokens)
            print(f"stopping: {gen_tokens} generated tokens >= budget_tokens {cfg.budget_tokens}")
            break
        t0 = time.perf_counter()
        seed_all(cfg.seed + 1000 * r)
        ctx.student.reset_live()  # fresh LoRA drawn from the round's seed: a resumed round is identical
        v = extract(ctx, r)
        v0 = v0 or v
        n0 = ctx.engine.n_generated  # the budget: calibration, walk-C probes and the round's rollouts
        if kappa is None:
            kappa = calibrate(ctx, v) if cfg.steer.calibrate else cfg.steer.kappa
        kappa = walk_c(ctx, v, kappa, r)
        samples = collect(ctx, v, kappa, r)
        gen_tokens += ctx.engine.n_generated - n0
        kept = [x for x in samples if x["kept"]]
        if len(kept) < cfg.min_train:
            ctx.log("filter_empty", round=r, kept=len(kept), generated=len(samples))
            raise FilterEmptyError(f"round {r}: the filter kept {len(kept)}/{len(samples)} completions, fewer than "
                                   f"min_train={cfg.min_train}; fix: loosen reward.max_tail_nll / max_repetition, "
                                   "lower steer.kappa_min, or raise gen.n_per_alpha")
        steered = evaluate_fixed(ctx, Steering(v, kappa))
        steered_mfv = mfv(ctx, Steering(v, kappa))
        try:
            hres = heal(ctx, kept, r)
        except HealDivergedError as e:
            ctx.log("heal_diverged", round=r, error=str(e))
            raise
        bake(ctx, r)
        healed = evaluate_fixed(ctx, None)
        healed_mfv = mfv(ctx, None)
        ctx.rd.save_json(f"round_{r:02d}/eval.json", dict(steered=steered, healed=healed))
        for tag, res in (("steered", steered_mfv), ("healed", healed_mfv)):
            if res is not None:
                ctx.rd.save_json(f"round_{r:02d}/mfv_{tag}.json", dict(summary=res.summary(), rows=res.rows))
        row = dict(round=r, kappa=kappa, generated=len(samples), kept=len(kept), gen_tokens=gen_tokens,
                   heal_nll=hres.train_nll,
                   val_nll=hres.val_nll, val_nll_before=hres.val_nll_before, heal_D=hres.D_mean,
                   barrier_frac=hres.barrier_frac, lam=hres.lam, heal_tokens_per_s=hres.tokens_per_s,
                   trait_steered=steered["trait"], trait_healed=healed["trait"], coh_steered=steered["coherence"],
                   coh_healed=healed["coherence"], incoherence_healed=healed["incoherence"],
                   tail_nll_steered=steered["tail_nll"],
                   tail_nll_healed=healed["tail_nll"], cos_r0=v.cosine(v0),
                   **mfv_columns(steered_mfv, base_mfv, ctx.preset.foundations, "_steered"),
                   **mfv_columns(healed_mfv, base_mfv, ctx.preset.foundations, "_healed"),
                   seconds=time.perf_counter() - t0)
        ctx.rd.append_row(row)
        ctx.tracker.log({f"round/{k}": x for k, x in row.items() if not isinstance(x, list)}, step=r)
        rows = ctx.rd.rows()
        print(format_table(rows, base=base_eval), flush=True)
        from steer_heal.report import write_report

        write_report(ctx.rd.path)
        if healed["coherence"] < cfg.coherence_floor:
            ctx.log("stop_coherence_floor", round=r, coherence=healed["coherence"], floor=cfg.coherence_floor)
            print(f"stopping: healed coherence {healed['coherence']:.2f} < floor {cfg.coherence_floor}")
            break
    ctx.tracker.close()
    return rows


def calibrate(ctx: Ctx, v: SteeringVector) -> float:
    s = ctx.cfg.steer
    users = ctx.preset.prompts[:s.calib_prompts]
    prompts = [render_prompt(ctx.student.tok, u) for u in users]
    with ctx.student.live_off():
        c, k = calibrate_coeff(ctx.student.model, ctx.student.tok, ctx.engine, v, prompts, s.target_kl,
                               s.calib_tokens, steps=s.calib_steps, log=lambda d: ctx.log(d.pop("event"), **d))
    ctx.log("calibrated", coeff=c, p95_kl=k, target=s.target_kl)
    print(f"  iso-KL calibration: c*={c:.3g} (p95 KL {k:.2f} nats, target {s.target_kl})")
    return c
