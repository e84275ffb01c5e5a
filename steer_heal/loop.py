"""The iterative loop: extract -> walk-C generate + filter -> steered eval -> heal -> bake -> healed eval.

Each stage is a named function; the shared ones (build, extract, calibrate, evaluate, bake) live in
stages.py, which the online run and the comparison call too.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from reward.components import Scorer
from steer_heal import stages
from steer_heal.chat import render_prompt
from steer_heal.config import RunConfig
from steer_heal.dose import walk_c
from steer_heal.engine import Sampling
from steer_heal.evals.mfv import mfv_columns
from steer_heal.heal import HealDivergedError, heal_round
from steer_heal.report import write_report
from steer_heal.rundir import RunDir, format_table, student_record
from steer_heal.steering import Steering, SteeringVector
from steer_heal.tracking import Tracker


class FilterEmptyError(RuntimeError):
    """The filter kept too few completions to train on."""


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Ctx:
    """What every stage of a round needs; built once per run."""
    b: stages.Built
    rd: RunDir
    tracker: Tracker
    scorer: Scorer
    heldout: Scorer | None = None  # the held-out trait judge of the round rows

    @property
    def cfg(self) -> RunConfig:
        return self.b.cfg

    def log(self, kind: str, **kw) -> None:
        self.rd.event(kind, **kw)


# ------------------------------------------------------------------ stages of a round
FILTERED = ["incoherence", "verbalisation", "refusal"]  # what Scorer.keep reads
SCORED = ["trait_llr"] + FILTERED


def generate_scored(ctx: Ctx, users: list[str], steering: Steering | None, seed: int, which: list[str] = SCORED):
    """Sample from the baked student (steered, or as the run's control says) and score under the
    base model. Each rollout's prompt_ids are the plain prompt's: what the heal trains on."""
    g = ctx.cfg.gen
    samp = Sampling(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, seed=seed)
    steering, system = stages.behaviour(ctx.b, steering)
    prompts = [render_prompt(ctx.b.tok, u, system=system) for u in users]
    with ctx.b.student.live_off():
        ro = ctx.b.engine.generate(prompts, steering, samp, logprobs=False, desc="generate")
        ro = stages.plain_prompts(ctx.b, users, ro) if system else ro
        comp = ctx.scorer.components(users, [r.completion_ids for r in ro], [r.text for r in ro],
                                     prompt_ids=[r.prompt_ids for r in ro], which=which)
    return ro, comp


def walk(ctx: Ctx, v: SteeringVector, kappa: float, r: int) -> float:
    """Walk-C on this round's probe batches (dose.walk_c does the stepping)."""
    s = ctx.cfg.steer
    rng = random.Random(ctx.cfg.seed * 7 + r)

    def pass_rate(k: float, step: int) -> float:
        users = rng.sample(ctx.b.preset.prompts, min(s.n_probe, len(ctx.b.preset.prompts)))
        _, sc = generate_scored(ctx, users, Steering(v, k), seed=ctx.cfg.seed + 100 * r + step, which=FILTERED)
        return sum(ctx.scorer.keep(sc)) / max(len(users), 1)

    return walk_c(pass_rate, kappa, s.kappa_min, s.walk_target_rate, s.walk_max_steps,
                  log=lambda d: ctx.log("walk_c", round=r, **d))


def collect(ctx: Ctx, v: SteeringVector, kappa: float, r: int):
    """Generate at each dose alpha * kappa, score, filter; log the per-dose table and borderline samples."""
    rng = random.Random(ctx.cfg.seed * 13 + r)
    rows, dose = [], []
    for ai, alpha in enumerate(ctx.cfg.steer.alphas):
        users = [rng.choice(ctx.b.preset.prompts) for _ in range(ctx.cfg.gen.n_per_alpha)]
        ro, sc = generate_scored(ctx, users, Steering(v, alpha * kappa), seed=ctx.cfg.seed + 1000 * r + ai)
        keep = ctx.scorer.keep(sc)
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
        for x in rows:
            f.write(json.dumps({k: v for k, v in x.items() if k != "_ro"}) + "\n")
    return rows


def heal(ctx: Ctx, kept: list[dict], r: int):
    ctx.b.engine.sleep()  # the GPU goes to training until the next generate
    examples = [(x["_ro"].prompt_ids, x["_ro"].completion_ids) for x in kept]

    def log_fn(row):
        ctx.log("heal_step", **row)
        ctx.tracker.log({f"heal/{k}": v for k, v in row.items()})

    try:
        res = heal_round(ctx.b.student, examples, ctx.cfg.heal, round_idx=r, seed=ctx.cfg.seed + r, log_fn=log_fn)
    except HealDivergedError as e:
        ctx.log("heal_diverged", round=r, error=str(e))
        raise
    ctx.b.student.save_live(ctx.rd.round_dir(r) / "adapter")
    return res


def evaluate(ctx: Ctx, steering: Steering | None) -> tuple[dict, object]:
    """The fixed-prompt scores and the MFV result of the steered (steering given) or baked student."""
    return (stages.student_eval(ctx.b, ctx.scorer, steering, desc="generate", heldout=ctx.heldout),
            stages.mfv_eval(ctx.b, steering))


def round_row(r, kappa, samples, kept, gen_tokens, hres, steered, healed, steered_mfv, healed_mfv, base_mfv,
              foundations, cos_r0, seconds) -> dict:
    return dict(round=r, kappa=kappa, generated=len(samples), kept=len(kept), gen_tokens=gen_tokens,
                heal_nll=hres.train_nll, val_nll=hres.val_nll, val_nll_before=hres.val_nll_before, heal_D=hres.D_mean,
                barrier_frac=hres.barrier_frac, barrier_active_frac=hres.active_frac,
                **{f"D_{a}": x for a, x in hres.D_by_agg.items()}, lam=hres.lam, heal_tokens_per_s=hres.tokens_per_s,
                trained_tokens=hres.tokens, opt_steps=hres.steps, lr_sum=hres.lr_sum,
                trait_steered=steered["trait"], trait_healed=healed["trait"], coh_steered=steered["coherence"],
                coh_healed=healed["coherence"], incoherence_healed=healed["incoherence"],
                repetition_healed=healed["repetition"], trait_heldout_healed=healed.get("trait_heldout", float("nan")),
                trait_heldout_steered=steered.get("trait_heldout", float("nan")),
                tail_nll_steered=steered["tail_nll"], tail_nll_healed=healed["tail_nll"], cos_r0=cos_r0,
                **mfv_columns(steered_mfv, base_mfv, foundations, "_steered"),
                **mfv_columns(healed_mfv, base_mfv, foundations, "_healed"), seconds=seconds)


# ------------------------------------------------------------------ main loop
def build(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> Ctx:
    b = stages.build(cfg, engine_seed=cfg.seed, progress=True)
    rd = RunDir(run_dir, cfg, resume=resume)
    return Ctx(b, rd, Tracker(cfg.report_to, rd.path, cfg.to_dict()), stages.scorer(b), stages.heldout(b))


def run(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> list[dict]:
    ctx = build(cfg, run_dir, resume)
    b, rd = ctx.b, ctx.rd
    rows = rd.rows()
    start = len(rows)
    if start:  # resume: rebuild the baked student from the last completed round's cumulative adapter
        b.student.load_cumulative(rd.round_dir(start - 1) / "cumulative")
        b.engine.push(b.student)
        ctx.log("resume", from_round=start)
    base = stages.base_eval(b, rd, ctx.scorer, heldout=ctx.heldout)
    base_mfv = stages.base_mfv(base)
    kappa = rows[-1]["kappa"] if rows else None
    gen_tokens = rows[-1].get("gen_tokens", 0) if rows else 0
    v0 = SteeringVector.load(rd.round_dir(0) / "vector.safetensors") if start else None
    for r in range(start, cfg.rounds):
        if cfg.budget_tokens and gen_tokens >= cfg.budget_tokens:
            ctx.log("stop_budget", round=r, gen_tokens=gen_tokens, budget=cfg.budget_tokens)
            print(f"stopping: {gen_tokens} generated tokens >= budget_tokens {cfg.budget_tokens}")
            break
        t0 = time.perf_counter()
        seed_all(cfg.seed + 1000 * r)
        b.student.reset_live()  # fresh LoRA drawn from the round's seed: a resumed round is identical
        v = stages.extract(b, progress=True)
        v.save(rd.round_dir(r) / "vector.safetensors")
        v0 = v0 or v
        n0 = b.engine.n_generated  # the budget: calibration, walk-C probes and the round's rollouts
        if cfg.control:  # a control generates without steering: no dose to find
            kappa = 0.0
        else:
            if kappa is None:
                kappa, _ = stages.starting_dose(b, v, ctx.log)
            kappa = walk(ctx, v, kappa, r)
        samples = collect(ctx, v, kappa, r)
        gen_tokens += b.engine.n_generated - n0
        kept = [x for x in samples if x["kept"]]
        if len(kept) < cfg.min_train and r > 0:  # a trained student whose steered text now fails: an outcome
            ctx.log("stop_filter_starved", round=r, kept=len(kept), generated=len(samples), min_train=cfg.min_train)
            print(f"stopping: round {r}: the filter kept {len(kept)}/{len(samples)} completions, fewer than "
                  f"min_train={cfg.min_train} (the trained student's steered text no longer passes the filter)")
            break
        if len(kept) < cfg.min_train:  # round 0, the base model's own steered text: a setting to fix
            ctx.log("filter_empty", round=r, kept=len(kept), generated=len(samples))
            raise FilterEmptyError(f"round {r}: the filter kept {len(kept)}/{len(samples)} completions, fewer than "
                                   f"min_train={cfg.min_train}; fix: loosen reward.max_tail_nll / max_repetition, "
                                   "lower steer.kappa_min, or raise gen.n_per_alpha")
        steered, steered_mfv = evaluate(ctx, Steering(v, kappa))
        hres = heal(ctx, kept, r)
        stages.bake(b, rd.round_dir(r), event=ctx.log)
        healed, healed_mfv = evaluate(ctx, None)
        rd.save_json(f"round_{r:02d}/eval.json", dict(steered=steered, healed=healed))
        for tag, res in (("steered", steered_mfv), ("healed", healed_mfv)):
            if res is not None:
                rd.save_json(f"round_{r:02d}/mfv_{tag}.json", dict(summary=res.summary(), rows=res.rows))
        row = round_row(r, kappa, samples, kept, gen_tokens, hres, steered, healed, steered_mfv, healed_mfv, base_mfv,
                        b.preset.foundations, v.cosine(v0), time.perf_counter() - t0) | stages.carried(b, v0)
        row["doses"] = [round(a * kappa, 6) for a in cfg.steer.alphas]  # what collect generated at, as logged
        rd.append_row(row, student_record(r, f"round_{r:02d}/cumulative", healed, row.get("d_trait_nats_healed"), row))
        ctx.tracker.log({f"round/{k}": x for k, x in row.items() if not isinstance(x, list)}, step=r)
        rows = rd.rows()
        print(format_table(rows, base=base), flush=True)
        write_report(rd.path)
        if healed["coherence"] < cfg.coherence_floor:
            ctx.log("stop_coherence_floor", round=r, coherence=healed["coherence"], floor=cfg.coherence_floor)
            print(f"stopping: healed coherence {healed['coherence']:.2f} < floor {cfg.coherence_floor}")
            break
    ctx.tracker.close()
    return rows
