"""What a study folder keeps between runs: its merged config (a changed setting that would change what finished
results mean is refused), and each arm's cached evaluation, reused only under the same fingerprint (a stale one
is moved aside, never overwritten)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from steer_heal.rundir import write_atomic
from steer_heal.study.arms import arm_dir, final_adapter, run_key
from steer_heal.study.config import Arm, CompareConfig, CompareError
from steer_heal.study.evaluate import Evaluator, arm_fingerprint

# settings whose change makes the study another study (arms and seeds may be added)
STUDY_KEYS = ("model", "preset", "budget_tokens", "dtype", "steer", "eval")


TESTING_KNOBS = ("stop_after_step", "dump_rank_weights", "debug_nan_step")  # not in a run's fingerprint either


def _results_part(arm: dict) -> dict:
    """An arm's definition less the testing knobs (a run stopped on purpose resumes under the same study)."""
    return arm | dict(overrides={k: v for k, v in (arm.get("overrides") or {}).items() if k not in TESTING_KNOBS})


def _differs(old, new) -> bool:
    """A setting the stored config does not have (it was added to the code later) does not count as a change."""
    if isinstance(old, dict) and isinstance(new, dict):
        return any(k in new and _differs(v, new[k]) for k, v in old.items())
    return old != new


def check_study_config(cfg: "CompareConfig") -> None:
    """Refuse a config that changed what the study's finished results mean; write the merged config otherwise."""
    f = cfg.dir / "compare_config.yaml"
    new = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as the YAML reads them back
    if f.exists():
        old = yaml.safe_load(f.read_text()) or {}
        changed = [k for k in STUDY_KEYS if k in old and _differs(old[k], new[k])]
        old_arms = {a["name"]: a for a in old.get("arms", [])}
        changed += [f"arm {a['name']}" for a in new["arms"]
                    if a["name"] in old_arms and _differs(_results_part(old_arms[a["name"]]), _results_part(a))]
        if changed:
            raise CompareError(f"{cfg.dir} holds a study run with other settings ({', '.join(changed)}); fix: restore "
                               f"them, or pass compare_dir=<a new folder> for the new study")
        new["arms"] = list(old_arms.values()) + [a for a in new["arms"] if a["name"] not in old_arms]
        new["seeds"] = sorted(set(old.get("seeds", [])) | set(new["seeds"]))
    write_atomic(f, yaml.safe_dump(new, sort_keys=False))


def _eval_key(cfg: CompareConfig, ev: "Evaluator", arm: Arm, seed) -> tuple[Path | None, str]:
    """(the adapter the arm's evaluation loads, the fingerprint its cached evaluation must carry)."""
    adapter = final_adapter(arm_dir(cfg, arm, seed)) if arm.trained else None
    return adapter, arm_fingerprint(ev.fp_eval, arm, adapter)


def current_eval(cfg: CompareConfig, ev: "Evaluator", arm: Arm, seed) -> dict | None:
    try:
        _, fp = _eval_key(cfg, ev, arm, seed)
    except RuntimeError:  # not trained (yet)
        return None
    return load_eval(cfg, arm, seed, fp)


def _eval_path(cfg: CompareConfig, arm: Arm, seed) -> Path:
    return cfg.dir / "eval" / f"{run_key(cfg, arm, seed)}.json"


def load_eval(cfg: CompareConfig, arm: Arm, seed, fingerprint: str | None = None) -> dict | None:
    """The arm's cached evaluation; with `fingerprint`, only one made under it (else None)."""
    f = _eval_path(cfg, arm, seed)
    if not f.exists():
        return None
    res = json.loads(f.read_text())
    return res if fingerprint is None or res.get("fingerprint") == fingerprint else None


def cached_eval(cfg, ev: Evaluator, arm: Arm, seed) -> tuple[dict, bool]:
    """(the arm's evaluation, whether it came from the cache)."""
    adapter, fp = _eval_key(cfg, ev, arm, seed)
    res = load_eval(cfg, arm, seed, fp)
    if res is not None:
        return res, True
    f = _eval_path(cfg, arm, seed)
    if f.exists():  # made under other settings or weights: kept beside, never overwritten
        stale = f.parent / "stale" / f"{f.stem}-{json.loads(f.read_text()).get('fingerprint', 'old')}.json"
        stale.parent.mkdir(exist_ok=True)
        os.replace(f, stale)
    t0 = time.perf_counter()
    res = ev.evaluate(arm, adapter) | dict(eval_seconds=time.perf_counter() - t0, fingerprint=fp)
    f.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(f, json.dumps(res))
    print(f"[compare] evaluated {arm.name}" + (f" (seed {seed})" if seed is not None else "") +
          f" in {res['eval_seconds']:.0f} s", flush=True)
    return res, False
