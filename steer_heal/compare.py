"""`steer-heal compare`: arms side by side at a matched generated-token budget, judged by one
evaluation on measures no arm trained on.

    arms (kinds): base | prompt (persona as system prompt) | steer (raw steering, iso-KL dose)
                  | iterative (`steer-heal run`) | online (`recipes/grpo_heal.py`)
    train:    each training arm is its own process through its normal entry point, into
              <compare_dir>/<arm>/, stopped at the first round / bake at or past budget_tokens;
              a finished arm is skipped, a killed one resumes (rounds.jsonl / checkpoint-N)
    evaluate: one function for every arm (final_eval): MFV trait and coherence, trait_llr under a
              held-out persona context (never the reward's), projection on the round-0 vector,
              free-generation coherence, KL(student || base) on held-out greedy answers
    report:   compare.md / compare.jsonl, frontier.png / frontier.html, answers.html
"""
from __future__ import annotations

import copy
import html as H
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from reward.components import Scorer
from steer_heal import stages
from steer_heal.chat import encode_prompt, render_prompt
from steer_heal.config import EvalConfig, ModelConfig, RunConfig, SteerConfig, apply_dict, setting
from steer_heal.engine import Sampling
from steer_heal.evals.mfv import evaluate_mfv, nanmean, trait_nats
from steer_heal.evals.student import SCORED, summarise
from steer_heal.heal.kl import aggregate, chunked_kl_and_logp
from steer_heal.logprobs import auto_chunk, final_hidden, lm_logits, pack
from steer_heal.models import causal_lm
from steer_heal.report import html_page
from steer_heal.rundir import fmt_cell, write_atomic
from steer_heal.steering import Steering, SteeringVector
from steer_heal.steering.hooks import steer

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("base", "prompt", "steer", "iterative", "online")


class CompareError(ValueError):
    """A bad comparison config; the message names the fix."""


@dataclass
class Arm:
    name: str = setting("", "the arm's name (its directory under compare_dir)")
    kind: str = setting("", "base | prompt (persona as system prompt) | steer | iterative | online")
    config: str = setting("", "the arm's own run config (iterative: a run YAML; online: a grpo YAML)")
    overrides: dict = setting({}, "iterative: section.key -> value; online: flat key -> value")
    launcher: str = setting("", "online: an accelerate config; the arm then runs under `accelerate launch`")


def _evaluator_steer() -> SteerConfig:
    # the steer baseline's vector and iso-KL dose, as the online run calibrates
    return SteerConfig(n_contexts=64, calib_tokens=16, calib_steps=3)


def _evaluator_eval() -> EvalConfig:
    # the held-out prompts (the preset's eval_prompts, which no arm trains on) and the MFV subset
    return EvalConfig(mfv_n=28, think_tokens=32, mfv_batch_size=28)


@dataclass
class CompareConfig:
    name: str = setting("compare", "the comparison's name")
    compare_dir: str = setting("", "output folder; default runs/compare-<name>")
    model: str = setting("HuggingFaceTB/SmolLM2-135M-Instruct", "every arm's model")
    preset: str = setting("care-over-authority", "every arm's preset")
    budget_tokens: int = setting(8000, "generated tokens per training arm (rollouts, walk-C probes, calibration)")
    seeds: list[int] = setting([42], "each training arm runs once per seed; the table shows mean and spread")
    dtype: str = setting("auto", "dtype of the evaluator's model")
    # the one evaluation and the baselines' vector: the run config's own sections (steer_heal/config.py)
    steer: SteerConfig = field(default_factory=_evaluator_steer)
    eval: EvalConfig = field(default_factory=_evaluator_eval)
    arms: list[Arm] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return Path(self.compare_dir or f"runs/compare-{self.name}")

    def run_config(self) -> RunConfig:
        """The evaluator as a run config, so it is built by the same stages as the runs."""
        rc = RunConfig(preset=self.preset, model=ModelConfig(model=self.model, dtype=self.dtype),
                       steer=copy.deepcopy(self.steer), eval=copy.deepcopy(self.eval))
        # every layer carries a LoRA slot, so any arm's cumulative adapter (whatever its band) loads
        rc.heal.lora_r, rc.heal.lora_alpha, rc.heal.lora_band = 4, 4, (0.0, 1.0)
        rc.gen.batch_size = self.eval.eval_prompts
        return rc


def load_compare(path: str, overrides: list[str] = ()) -> CompareConfig:
    p = Path(path)
    if not p.exists():
        raise CompareError(f"comparison config '{path}' not found; fix: pass e.g. recipes/compare/smollm2_cpu.yaml")
    d = yaml.safe_load(p.read_text()) or {}
    for it in overrides:
        if "=" not in it:
            raise CompareError(f"override '{it}' is not key=value; fix: write e.g. budget_tokens=4000")
        k, v = it.split("=", 1)
        node = d
        *parents, leaf = k.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(v)
    arms = d.pop("arms", [])
    sections = {k: d.pop(k) for k in ("steer", "eval") if k in d}
    known = {f for f in CompareConfig.__dataclass_fields__ if f != "arms"}
    bad = sorted(set(d) - known)
    if bad:
        raise CompareError(f"unknown comparison key(s) {bad}; fix: use one of {sorted(known)}")
    cfg = CompareConfig(**d)
    for k, v in sections.items():
        apply_dict(getattr(cfg, k), v, prefix=f"{k}.")
    for a in arms:
        arm = Arm(**a)
        if arm.kind not in KINDS:
            raise CompareError(f"arm '{arm.name}': unknown kind '{arm.kind}'; fix: one of {KINDS}")
        if arm.kind in ("iterative", "online") and not arm.config:
            raise CompareError(f"arm '{arm.name}' ({arm.kind}) needs config:; fix: point it at the arm's run config")
        cfg.arms.append(arm)
    names = [a.name for a in cfg.arms]
    if len(set(names)) != len(names):
        raise CompareError(f"arm names repeat in {names}; fix: give every arm its own name")
    return cfg


# ------------------------------------------------------------------ training arms
def arm_dir(cfg: CompareConfig, arm: Arm, seed: int) -> Path:
    return cfg.dir / (arm.name if len(cfg.seeds) == 1 else f"{arm.name}-s{seed}")


def _latest_checkpoint(d: Path) -> Path | None:
    cks = sorted(d.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return cks[-1] if cks else None


def train_command(cfg: CompareConfig, arm: Arm, seed: int) -> list[str]:
    """The arm's normal entry point, pointed at its directory, seed and budget (resuming if it was killed)."""
    d = arm_dir(cfg, arm, seed)
    if arm.kind == "iterative":
        if (d / "rounds.jsonl").exists() and (d / "config.yaml").exists():
            return [sys.executable, "-m", "steer_heal.cli", "run", "--resume", str(d)]
        ov = {"model.model": cfg.model, "preset": cfg.preset, "seed": seed, "budget_tokens": cfg.budget_tokens,
              "rounds": 1000, "run_dir": str(d)} | dict(arm.overrides)
        return [sys.executable, "-m", "steer_heal.cli", "run", "--config", arm.config] + [
            f"{k}={_s(v)}" for k, v in ov.items()
        ]
    grpo = yaml.safe_load(Path(arm.config).read_text()) or {}
    bake_every = int(arm.overrides.get("bake_every", grpo.get("bake_every", 4)))
    # max_steps stays the config's (it shapes the lr schedule): it must reach the budget (checked after the run)
    ov = {"model": cfg.model, "preset": cfg.preset, "seed": seed, "budget_tokens": cfg.budget_tokens,
          "output_dir": str(d), "save_strategy": "steps", "save_steps": bake_every,
          "mfv_n": cfg.eval.mfv_n, "think_tokens": cfg.eval.think_tokens} | dict(arm.overrides)
    head = [sys.executable]
    if arm.launcher:
        head = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", arm.launcher]
    cmd = head + [str(ROOT / "recipes/grpo_heal.py"), "--config", arm.config]
    for k, v in ov.items():
        cmd += [f"--{k}", _s(v)]
    ck = _latest_checkpoint(d)
    if ck is not None:
        cmd += ["--resume_from_checkpoint", str(ck)]
    return cmd


def _s(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)


def train_arm(cfg: CompareConfig, arm: Arm, seed: int) -> dict:
    """Run (or resume) one training arm to its budget; a finished arm is skipped."""
    d = arm_dir(cfg, arm, seed)
    done = d / "arm_done.json"
    if done.exists():
        return json.loads(done.read_text())
    d.mkdir(parents=True, exist_ok=True)
    cmd = train_command(cfg, arm, seed)
    print(f"[compare] {arm.name} (seed {seed}): {' '.join(cmd[1:4])} ... -> {d}/train.log", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": str(ROOT)}
    with open(d / "train.log", "a") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"arm '{arm.name}' exited with {rc}; see {d}/train.log (fix the cause and run compare "
                           "again: it resumes this arm)")
    rows = arm_rows(d, arm.kind)
    # seconds: the arm's own per-round / per-bake times (they survive a kill and resume), plus this
    # attempt's wall time for the record
    info = dict(arm=arm.name, seed=seed, seconds=sum(float(r.get("seconds", 0.0)) for r in rows),
                last_attempt_wall_s=time.perf_counter() - t0, gen_tokens=rows[-1].get("gen_tokens", 0) if rows else 0,
                n_rows=len(rows))
    if info["gen_tokens"] < cfg.budget_tokens:
        print(f"warning: arm '{arm.name}' ended at {info['gen_tokens']} generated tokens, under budget_tokens "
              f"{cfg.budget_tokens} (its max_steps / rounds ran out first); its row is not at the matched budget",
              flush=True)
    write_atomic(done, json.dumps(info))
    return info


def arm_rows(d: Path, kind: str) -> list[dict]:
    f = d / ("rounds.jsonl" if kind == "iterative" else "bakes.jsonl")
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def final_adapter(d: Path, kind: str) -> Path:
    rows = arm_rows(d, kind)
    if not rows:
        raise RuntimeError(f"{d} holds no completed round or bake; fix: raise budget_tokens or check {d}/train.log")
    k = rows[-1]["round"] if kind == "iterative" else rows[-1]["bake"]
    return d / (f"round_{k:02d}" if kind == "iterative" else f"bake_{k:02d}") / "cumulative"


# ------------------------------------------------------------------ the one evaluation
class Evaluator:
    """Holds the base model (as a Student, so trained arms load their cumulative adapter), the two
    scorers, the round-0 vector and dose, and the vignettes; evaluates any arm the same way."""

    def __init__(self, cfg: CompareConfig):
        self.cfg = cfg
        rc = cfg.run_config()
        p = stages.run_preset(rc)  # refused before the model loads
        if not (p.eval_persona_pos and p.eval_persona_neg):
            raise CompareError(f"preset '{p.name}' has no held-out eval_persona_pos/neg; fix: add them (written for "
                               "evaluation only) so arms are not judged by the reward's own context")
        self.b = stages.build(rc, engine_seed=0)
        self.preset = p = self.b.preset
        self.student, self.tok, self.engine = self.b.student, self.b.tok, self.b.engine
        self.users = p.eval_prompts[:cfg.eval.eval_prompts]
        self.scorer = stages.scorer(self.b)  # coherence components, the runs' own scorer
        self.heldout = heldout_scorer(self.student.model, self.tok, p, ref_ctx=self.student.base)
        self.v0, self.kappa0 = self._vector()
        self.scorer.vector = self.v0

    def _vector(self) -> tuple[SteeringVector, float]:
        """The base model's vector and its iso-KL dose, computed once and cached in the compare dir."""
        vp, sp = self.cfg.dir / "vector_r0.safetensors", self.cfg.dir / "steer.json"
        if vp.exists() and sp.exists():
            return SteeringVector.load(vp), json.loads(sp.read_text())["kappa"]
        v = stages.extract(self.b)  # no adapter is loaded yet: the base model's vector
        c, _ = stages.calibrate(self.b, v)
        self.cfg.dir.mkdir(parents=True, exist_ok=True)
        v.save(vp)
        write_atomic(sp, json.dumps(dict(kappa=c)))
        return v, c

    def evaluate(self, kind: str, adapter: Path | None = None) -> dict:
        """Every measure for one arm: the student as the arm leaves it, on prompts no arm trained on."""
        system = self.preset.persona_pos if kind == "prompt" else None
        steering = Steering(self.v0, self.kappa0) if kind == "steer" else None
        if adapter is not None:
            self.student.load_cumulative(adapter)
            ctx = self.student.live_off
        else:
            ctx = self.student.base
        with ctx():
            prompts = [render_prompt(self.tok, u, system=system) for u in self.users]
            ro = self.engine.generate(prompts, steering, Sampling(max_new_tokens=self.cfg.eval.eval_max_new_tokens,
                                                                   temperature=0.0), logprobs=False)
            ids, texts = [r.completion_ids for r in ro], [r.text for r in ro]
            kl = kl_to_base(self.student, self.tok, [r.prompt_ids for r in ro], ids,
                            [encode_prompt(self.tok, render_prompt(self.tok, u)) for u in self.users], steering)
            e = self.cfg.eval
            mfv = evaluate_mfv(self.student.model, self.tok, self.b.mfv_rows, e.think_tokens, e.mfv_batch_size,
                               steering, progress=False, read=e.mfv_read, system=system) if self.b.mfv_rows else None
        # scored under the base model with the plain prompt: the persona prompt is not part of the judge
        comp = self.scorer.components(self.users, ids, texts, which=SCORED + ["trait_projection"])
        held = self.heldout.components(self.users, ids, texts, which=["trait_llr"])
        s = summarise(self.scorer, comp)
        out = dict(trait_llr_heldout=nanmean(held["trait_llr"]), trait_llr_reward_ctx=s["trait"],
                   projection=nanmean(comp["trait_projection"]), incoherence=s["incoherence"], tail_nll=s["tail_nll"],
                   repetition=s["repetition"], coherent=s["coherence"], verbalisation=s["verbalisation"],
                   refusal=s["refusal"], kl_rmse=kl["rmse"], kl_mean=kl["mean"], texts=texts, prompts=self.users)
        if mfv is not None:
            out.update(trait_nats=trait_nats(mfv, self.preset.foundations), pmass=mfv.pmass_allowed,
                       nll_prefill=mfv.nll_prefill, unscorable=mfv.frac_unscorable, profile=mfv.profile)
        return out


def heldout_scorer(model, tok, preset, **kw) -> Scorer:
    """trait_llr under the preset's held-out pair and demonstrations (never the reward's context)."""
    return Scorer(model, tok, (preset.eval_persona_pos, preset.eval_persona_neg), demos=preset.eval_persona_demos, **kw)


@torch.no_grad()
def kl_to_base(student, tok, prompt_ids, completion_ids, base_prompt_ids, steering) -> dict:
    """Per-sequence rmse and mean over completion positions of the exact KL(student || base), where
    the student reads its own prompt (persona prompt, steering) and the base the plain one."""
    model = student.model
    keep = [i for i, c in enumerate(completion_ids) if c]
    if not keep:
        return dict(rmse=float("nan"), mean=float("nan"))
    a = pack([prompt_ids[i] for i in keep], [completion_ids[i] for i in keep], tok.pad_token_id)
    b = pack([base_prompt_ids[i] for i in keep], [completion_ids[i] for i in keep], tok.pad_token_id)
    device = next(model.parameters()).device
    a, b = a.to(device), b.to(device)
    ba, sa, tgt = a.targets()
    bb, sb, _ = b.targets()
    with steer(model, steering):
        h_s = final_hidden(model, a.input_ids, a.attention_mask)[ba, sa]
    with student.base():
        h_b = final_hidden(model, b.input_ids, b.attention_mask)[bb, sb]
    vocab = causal_lm(model).get_output_embeddings().weight.shape[0]
    kl, _ = chunked_kl_and_logp(h_s, h_b, tgt, lambda x: lm_logits(model, x), auto_chunk(vocab))
    n = len(keep)
    return dict(rmse=float(aggregate(kl, ba, n, "rmse").mean()), mean=float(aggregate(kl, ba, n, "mean").mean()))


# ------------------------------------------------------------------ the driver
COLUMNS = [
    ("arm", "arm", "{}"),
    ("kind", "kind", "{}"),
    ("gen_tokens", "gen_tok", "{:.0f}"),
    ("seconds", "sec", "{:.0f}"),
    ("d_trait_nats", "d_trait_mfv", "{:+.3f}"),
    ("d_trait_llr_heldout", "d_trait_llr*", "{:+.3f}"),
    ("projection", "proj_v0", "{:+.3f}"),
    ("d_incoherence", "d_incoh", "{:+.3f}"),
    ("tail_nll", "tail_nll", "{:.2f}"),
    ("repetition", "rep", "{:.3f}"),
    ("coherent", "coh", "{:.2f}"),
    ("verbalisation", "verb", "{:.2f}"),
    ("refusal", "refus", "{:.2f}"),
    ("pmass", "pmass", "{:.3f}"),
    ("nll_prefill", "nll_pre", "{:.2f}"),
    ("unscorable", "unsc", "{:.2f}"),
    ("kl_rmse", "kl_rmse", "{:.3f}"),
    ("kl_mean", "kl_mean", "{:.3f}"),
]


def run_compare(cfg: CompareConfig, only: list[str] | None = None) -> list[dict]:
    arms = [a for a in cfg.arms if not only or a.name in only]
    if only and len(arms) != len(only):
        raise CompareError(f"--arms {only}: unknown arm(s) {sorted(set(only) - {a.name for a in cfg.arms})}; "
                           f"fix: pick from {[a.name for a in cfg.arms]}")
    cfg.dir.mkdir(parents=True, exist_ok=True)
    write_atomic(cfg.dir / "compare_config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    for arm in arms:  # train first (each its own process), then one evaluator for all
        if arm.kind in ("iterative", "online"):
            for seed in cfg.seeds:
                train_arm(cfg, arm, seed)
    ev = Evaluator(cfg)
    base = _cached_eval(cfg, ev, Arm("base", "base"), None)
    rows = []
    for arm in arms:
        for seed in (cfg.seeds if arm.kind in ("iterative", "online") else [None]):
            rows.append(_row(cfg, ev, arm, seed, base))
    write_report(cfg, rows, base)
    return rows


def _cached_eval(cfg, ev: Evaluator, arm: Arm, seed) -> dict:
    key = arm.name if seed is None or len(cfg.seeds) == 1 else f"{arm.name}-s{seed}"
    f = cfg.dir / "eval" / f"{key}.json"
    if f.exists():
        return json.loads(f.read_text())
    adapter = final_adapter(arm_dir(cfg, arm, seed), arm.kind) if arm.kind in ("iterative", "online") else None
    res = ev.evaluate(arm.kind, adapter)
    f.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(f, json.dumps(res))
    return res


def _row(cfg, ev, arm: Arm, seed, base: dict) -> dict:
    info = {}
    if arm.kind in ("iterative", "online"):
        info = json.loads((arm_dir(cfg, arm, seed) / "arm_done.json").read_text())
    elif arm.kind == "steer":
        info = dict(gen_tokens=0)
    res = _cached_eval(cfg, ev, arm, seed)
    row = dict(arm=arm.name, kind=arm.kind, seed=seed, gen_tokens=info.get("gen_tokens", 0),
               seconds=info.get("seconds", 0.0), **{k: v for k, v in res.items() if k not in ("texts", "prompts")})
    for k in ("trait_nats", "trait_llr_heldout", "incoherence"):
        if k in res and k in base:
            row[f"d_{k}"] = res[k] - base[k]
    if arm.kind in ("iterative", "online"):
        row["trajectory"] = trajectory(arm_dir(cfg, arm, seed), arm.kind)
    row["texts"], row["prompts"] = res["texts"], res["prompts"]
    return row


def trajectory(d: Path, kind: str) -> list[dict]:
    """(coherence lost, trait gained, tokens) per round / bake, from the arm's own table and base."""
    rows = arm_rows(d, kind)
    be = json.loads((d / "base_eval.json").read_text()) if (d / "base_eval.json").exists() else {}
    b_inc = be.get("incoherence")
    x_key, y_key = ("incoherence_healed", "d_trait_nats_healed") if kind == "iterative" else ("incoherence",
                                                                                              "d_trait_nats")
    return [dict(x=r.get(x_key, float("nan")) - b_inc if b_inc is not None else float("nan"),
                 y=r.get(y_key, float("nan")), gen_tokens=r.get("gen_tokens", 0)) for r in rows]


def _fmt(v, f):
    """A table cell; NaN (an arm without that measure) shows as "-" like a missing value."""
    return "-" if isinstance(v, float) and not math.isfinite(v) else fmt_cell(v, f)


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per arm: the mean over seeds, with the spread (sd) as `<col>_sd` when there are several."""
    out = []
    for name in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == name]
        m = dict(arm=name, kind=rs[0]["kind"], n_seeds=len(rs))
        for k, _, _ in COLUMNS[2:]:
            xs = [r[k] for r in rs if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            m[k] = sum(xs) / len(xs) if xs else float("nan")
            if len(xs) > 1:
                m[f"{k}_sd"] = statistics.stdev(xs)
        out.append(m)
    return out


def format_compare(rows: list[dict]) -> str:
    summ = summary_rows(rows)
    head = [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summ:
        cells = []
        for k, _, f in COLUMNS:
            c = _fmt(r.get(k), f)
            if f"{k}_sd" in r:
                c += " ±" + _fmt(r[f"{k}_sd"], f).lstrip("+")
            cells.append(c)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(cfg: CompareConfig, rows: list[dict], base: dict) -> None:
    d = cfg.dir
    with open(d / "compare.jsonl.tmp", "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k not in ("texts", "prompts")}) + "\n")
    os.replace(d / "compare.jsonl.tmp", d / "compare.jsonl")
    legend = ("d_trait_mfv: change of the MFV trait_nats vs base; d_trait_llr*: trait_llr under the held-out persona "
              "context vs base; proj_v0: projection on the base model's vector; d_incoh: incoherence (tail NLL + loop "
              "penalty, nats) vs base; kl_*: KL(student || base) on the held-out greedy answers.")
    write_atomic(d / "compare.md", f"# {cfg.name}: {cfg.model}, {cfg.preset}, budget {cfg.budget_tokens} generated "
                                   f"tokens per training arm\n\n" + format_compare(rows) + "\n" + legend + "\n")
    print(format_compare(rows), flush=True)
    frontier(d, rows)
    answers_page(d, rows)


def frontier(d: Path, rows: list[dict]) -> None:
    """x: coherence lost vs base (incoherence, nats); y: trait gained (MFV trait_nats vs base); a point
    per arm, lines through the training arms' rounds / bakes."""
    pts = [
        dict(
            arm=r["arm"],
            kind=r["kind"],
            x=r.get("d_incoherence", float("nan")),
            y=r.get("d_trait_nats", float("nan")),
            traj=r.get("trajectory", []),
        )
        for r in rows
    ]

    svg_rows = "".join(f"<tr><td>{H.escape(p['arm'])}</td><td>{p['kind']}</td><td>{_fmt(p['x'], '{:+.3f}')}</td>"
                       f"<td>{_fmt(p['y'], '{:+.3f}')}</td></tr>" for p in pts)
    data = json.dumps([{k: v for k, v in p.items()} for p in pts], allow_nan=True).replace("NaN", "null")
    write_atomic(
        d / "frontier.html",
        html_page(
            "frontier",
            f"""<h2>Trait gained vs coherence lost (one point per arm; lines: rounds / bakes)</h2>
<p>x: incoherence vs base (nats, lower is better); y: MFV trait_nats vs base (higher is more trait).</p>
<canvas id=c width=760 height=520></canvas>
<table border=1 cellpadding=4>
<tr><th>arm</th><th>kind</th><th>d_incoherence</th><th>d_trait_nats</th></tr>{svg_rows}</table>
<script>
const P={data};const c=document.getElementById('c').getContext('2d');
const xs=[],ys=[];P.forEach(p=>{{if(p.x!=null){{xs.push(p.x);ys.push(p.y)}}
  (p.traj||[]).forEach(t=>{{if(t.x!=null&&t.y!=null){{xs.push(t.x);ys.push(t.y)}}}})}});
xs.push(0);ys.push(0);const x0=Math.min(...xs),x1=Math.max(...xs),y0=Math.min(...ys),y1=Math.max(...ys);
const X=v=>60+(v-x0)/((x1-x0)||1)*660,Y=v=>480-(v-y0)/((y1-y0)||1)*440;
c.strokeStyle='#999';c.beginPath();c.moveTo(X(0),20);c.lineTo(X(0),480);c.moveTo(60,Y(0));c.lineTo(720,Y(0));c.stroke();
const col=k=>({{base:'#000',prompt:'#d62728',steer:'#ff7f0e',iterative:'#1f77b4',online:'#2ca02c'}})[k]||'#555';
P.forEach(p=>{{c.strokeStyle=col(p.kind);c.fillStyle=col(p.kind);const t=(p.traj||[]).filter(q=>q.x!=null&&q.y!=null);
if(t.length){{c.beginPath();c.moveTo(X(0),Y(0));t.forEach(q=>c.lineTo(X(q.x),Y(q.y)));c.globalAlpha=.35;c.stroke();c.globalAlpha=1}}
if(p.x!=null&&p.y!=null){{c.beginPath();c.arc(X(p.x),Y(p.y),5,0,7);c.fill();c.fillText(p.arm,X(p.x)+7,Y(p.y)-5)}}}});
</script>""",
        ),
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    colors = {"base": "k", "prompt": "tab:red", "steer": "tab:orange", "iterative": "tab:blue", "online": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.axhline(0, color="0.8", lw=1)
    ax.axvline(0, color="0.8", lw=1)
    for p in pts:
        c = colors.get(p["kind"], "0.4")
        t = [q for q in p["traj"] if math.isfinite(q["x"]) and math.isfinite(q["y"])]
        if t:
            ax.plot([0] + [q["x"] for q in t], [0] + [q["y"] for q in t], "-", color=c, alpha=0.35, lw=1)
        if math.isfinite(p["x"]) and math.isfinite(p["y"]):
            ax.scatter([p["x"]], [p["y"]], color=c, s=40, zorder=3)
            ax.annotate(p["arm"], (p["x"], p["y"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("coherence lost: incoherence vs base (nats, held-out greedy answers)")
    ax.set_ylabel("trait gained: MFV trait_nats vs base")
    ax.set_title("steer-heal compare: trait per unit of coherence lost")
    fig.tight_layout()
    fig.savefig(d / "frontier.png", dpi=120)
    plt.close(fig)


def answers_page(d: Path, rows: list[dict], n: int = 4) -> None:
    seen, cols = set(), []
    for r in rows:
        if r["arm"] not in seen:
            seen.add(r["arm"])
            cols.append(r)
    prompts = next((r.get("prompts") for r in rows if r.get("prompts")), None) or []
    body = []
    for i in range(min(n, len(cols[0]["texts"]) if cols else 0)):
        body.append(f"<h3>{H.escape(prompts[i]) if i < len(prompts) else i}</h3><table border=1 cellpadding=4>")
        body += [f"<tr><td><b>{H.escape(r['arm'])}</b></td><td>{H.escape(r['texts'][i])}</td></tr>" for r in cols]
        body.append("</table>")
    write_atomic(d / "answers.html", html_page("answers", "<h2>Every arm's greedy answers to the same held-out "
                                                          "prompts</h2>" + "".join(body)))
