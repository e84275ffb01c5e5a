"""What the online reward gave each arm of a study: the diagnostics its runs logged, next to its evaluation.

    python recipes/reward_signal.py runs/compare-smollm2_reward docs/studies/smollm2_reward
    python recipes/reward_signal.py --render docs/studies/smollm2_reward      # from the committed json alone

Reads each online arm's run directory (config.yaml, bakes.jsonl, events.jsonl `reward_signal` and `rollouts`:
the shares are recomputed from each step's logged rewards, on what the advantage sums under the run's
reward_norm) and writes
<docs>/reward_signal.json (the numbers) and <docs>/reward_signal.md (one row per arm: its setting, its dev
trait_llr* and incoh_ctx from compare.jsonl, its heal gain from answers.json, and what the advantage carried).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import yaml

from steer_heal.grpo.advantage import advantage_parts, reward_diagnostics

SETTINGS = ("objective", "rollout_alphas", "w_incoh", "reward_norm", "is_correction")  # when the study has no config
GRAD_TERMS = ("policy", "nll", "barrier")
COMPONENTS = ("trait_llr", "incoherence", "verbalisation", "refusal")


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def step_shares(rollouts: list[dict], reward: dict, norm: str) -> dict[str, float | None]:
    """Each component's share of the within-group variance of what the advantage sums, mean over steps,
    from the per-rollout rewards a run logged (runs from before the trainer logged these shares under
    per_term reported them on the raw rewards)."""
    w = {"trait_llr": reward.get("w_trait", 1.0), "trait_projection": reward.get("w_trait", 1.0),
         "verbalisation": reward.get("w_verb", 1.0), "incoherence": reward.get("w_incoh", 1.0),
         "refusal": reward.get("w_refusal", 1.0)}
    per = []
    for e in rollouts:
        names = list(e["rewards"])
        r = torch.tensor([e["rewards"][n] for n in names], dtype=torch.float64).T
        G = int(e["group"])
        d = reward_diagnostics(r, names, G, advantage_parts(r, [w.get(n, 1.0) for n in names], G, norm))
        per.append(d)
    return {c: _mean(d.get(f"{c}/share") for d in per) for c in COMPONENTS}


def arm_signal(d: Path) -> dict | None:
    """One online run's diagnostics: its setting, per-step means, per-bake gradient norms, shift_cos."""
    rows = _jsonl(d / "bakes.jsonl")
    if not rows:
        return None
    cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
    online, reward = cfg.get("online", {}), cfg.get("reward", {})
    setting = {k: online.get(k, reward.get(k)) for k in SETTINGS}
    events = _jsonl(d / "events.jsonl")
    sig = [e for e in events if e.get("event") == "reward_signal"]
    rollouts = [e for e in events if e.get("event") == "rollouts" and e.get("rewards")]
    out = dict(setting=setting, steps=len(sig), control=cfg.get("control", ""),
               adv_dose_corr=_mean(e.get("adv_dose_corr") for e in sig),
               groups_zero_sd=_mean(e.get("groups_zero_sd") for e in sig),
               share=step_shares(rollouts, reward, online.get("reward_norm", "sum")) if rollouts else
               {c: _mean(e.get(f"{c}/share") for e in sig) for c in COMPONENTS},
               sd={c: _mean(e.get(f"{c}/sd") for e in sig) for c in COMPONENTS},
               grad={t: [r.get(f"grad_{t}") for r in rows] for t in GRAD_TERMS},
               is_ratio_mean=_mean(r.get("is_ratio_mean") for r in rows),
               is_ratio_max=max([r["is_ratio_max"] for r in rows if r.get("is_ratio_max") is not None], default=None),
               shift_cos=[r.get("shift_cos") for r in rows], shift_dose=[r.get("shift_dose") for r in rows],
               kl_rmse=[r.get("kl_rmse") for r in rows], kappa=[r.get("kappa") for r in rows])
    return out


def collect(compare_dir: Path) -> dict:
    """Every online run of a study folder, with its arm's overrides from the study's compare_config.yaml."""
    f = compare_dir / "compare_config.yaml"
    arms = {a["name"]: a.get("overrides") or {} for a in (yaml.safe_load(f.read_text()) or {}).get("arms", [])} \
        if f.exists() else {}
    out = {}
    for d in sorted(p for p in compare_dir.iterdir() if (p / "bakes.jsonl").exists()):
        s = arm_signal(d)
        if s is not None:
            s["overrides"] = arms.get(d.name.rpartition("-s")[0] or d.name, arms.get(d.name))
            out[d.name] = s
    return out


def _f(x, fmt="{:+.3f}") -> str:
    if x is None:
        return "-"
    if isinstance(x, list):
        return " / ".join(_f(v, fmt) for v in x)
    return fmt.format(x)


def render(docs: Path) -> str:
    sig = json.loads((docs / "reward_signal.json").read_text())
    evals = {(r["arm"], r.get("seed")): r for r in _jsonl(docs / "compare.jsonl")}
    answers = json.loads((docs / "answers.json").read_text()) if (docs / "answers.json").exists() else []
    gain = {a["arm"]: a for a in answers if a.get("question") == "Q1"}
    head = ("| run | setting | trait_llr* | incoh_ctx | heal gain | A~dose | sd-0 groups | share trait / incoh / "
            "verb / refus | grad policy (bake 0 / 1) | grad nll | grad barrier | pi/mu mean, max | shift_cos "
            "| kl_rmse |")
    lines = ["# What the reward gave the advantage, per run", "",
             "Generated by `recipes/reward_signal.py` from each run's events.jsonl / bakes.jsonl (numbers in "
             "reward_signal.json) and the study's compare.jsonl / answers.json. A~dose: correlation of the advantage "
             "with the rollout's dose inside groups, mean over steps. Shares: each reward component's share of the "
             "summed reward's within-group variance (covariance share; they sum to 1), mean over steps. Gradient "
             "norms: each loss term as it enters the total, on the live LoRA, at each bake's first step. shift_cos: "
             "the student's mean activation shift from base (steered layers, held-out prompts) against the round-0 "
             "vector, per bake. Setting: the arm's overrides in the study config.", "", head,
             "|" + "---|" * (head.count("|") - 1)]

    for run, s in sig.items():
        arm, _, seed = run.rpartition("-s")
        key = (arm, int(seed)) if seed.isdigit() else (run, None)
        ev = evals.get(key) or next((r for (a, _), r in evals.items() if a == key[0]), {})
        st = s.get("overrides") or s["setting"]
        setting = ", ".join(f"{k} {v}" for k, v in st.items() if v not in (None, "")).replace("|", "/")
        g = gain.get(key[0], {})
        hg = "-" if g.get("value") is None or (isinstance(g.get("value"), float) and math.isnan(g["value"])) \
            else f"{g['value']:+.3f}"
        sh = " / ".join(_f(s["share"].get(c), "{:.2f}") for c in COMPONENTS)
        lines.append(f"| {run} | {setting} | {_f(ev.get('trait_llr_heldout'))} | {_f(ev.get('incoh_ctx'), '{:.2f}')} | "
                     f"{hg} | {_f(s['adv_dose_corr'], '{:+.2f}')} | {_f(s['groups_zero_sd'], '{:.2f}')} | {sh} | "
                     f"{_f(s['grad']['policy'], '{:.3g}')} | {_f(s['grad']['nll'], '{:.3g}')} | "
                     f"{_f(s['grad']['barrier'], '{:.3g}')} | {_f(s['is_ratio_mean'], '{:.2f}')}, "
                     f"{_f(s['is_ratio_max'], '{:.2f}')} | {_f(s['shift_cos'])} | {_f(s['kl_rmse'], '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compare_dir", nargs="?", help="the study's run folder (runs/compare-<name>)")
    ap.add_argument("docs", nargs="?", help="the committed study folder (docs/studies/<name>)")
    ap.add_argument("--render", metavar="DOCS", help="rebuild reward_signal.md from the committed json only")
    a = ap.parse_args(argv)
    if a.render:
        docs = Path(a.render)
    else:
        if not (a.compare_dir and a.docs):
            ap.error("give COMPARE_DIR DOCS, or --render DOCS")
        docs = Path(a.docs)
        docs.mkdir(parents=True, exist_ok=True)
        (docs / "reward_signal.json").write_text(json.dumps(collect(Path(a.compare_dir)), indent=1) + "\n")
    (docs / "reward_signal.md").write_text(render(docs))
    print(f"wrote {docs / 'reward_signal.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
