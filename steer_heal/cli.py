"""`steer-heal run | export`: the command-line entry points."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml


def _run(args) -> int:
    from steer_heal.config import config_from_dict, load_config
    from steer_heal.loop import run

    if args.resume:
        cfg_file = Path(args.resume) / "config.yaml"
        if not cfg_file.exists():
            raise SystemExit(f"error: '{args.resume}' has no config.yaml; fix: pass the folder of an earlier run")
        cfg = load_config(args.config, args.overrides) if args.config else config_from_dict(
            yaml.safe_load(cfg_file.read_text()))
        if not args.config and args.overrides:
            from steer_heal.config import _apply, parse_overrides

            _apply(cfg, parse_overrides(args.overrides))
        run_dir = args.resume
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = cfg.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.run_dir = str(run_dir)
    print(f"steer-heal: run dir {run_dir}  model {cfg.model.model}  preset {cfg.preset}  rounds {cfg.rounds}")
    run(cfg, run_dir, resume=bool(args.resume))
    print(f"done: {run_dir}/round_table.md, {run_dir}/trajectory.html, {run_dir}/outputs.html")
    return 0


def _export(args) -> int:
    from steer_heal.rundir import read_jsonl
    from steer_heal.student import export_merged

    d = Path(args.run_dir)
    rows = read_jsonl(d / "rounds.jsonl")
    if not rows:
        raise SystemExit(f"error: '{d}' has no completed round; fix: export a run directory with rounds.jsonl")
    r = rows[-1]["round"] if args.round is None else args.round
    cum = d / f"round_{r:02d}" / "cumulative"
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    from steer_heal.models import resolve_model_path

    out = Path(args.out or d / f"merged_round_{r:02d}")
    export_merged(resolve_model_path(cfg["model"]["model"]), cum, out)
    print(f"exported round {r} merged model to {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="steer-heal", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the iterative steer -> filter -> heal -> bake loop")
    r.add_argument("--config", help="YAML config (recipes/configs/*.yaml)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue after the last completed round of RUN_DIR")
    r.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. heal.lam=0.3 rounds=4")
    e = sub.add_parser("export", help="write a merged model that loads with plain transformers")
    e.add_argument("run_dir")
    e.add_argument("--round", type=int, default=None)
    e.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        return {"run": _run, "export": _export}[args.cmd](args)
    except (ValueError, RuntimeError, OSError) as e:  # our errors carry their fix; show one line, not a trace
        from steer_heal.heal import HealDivergedError

        if isinstance(e, (HealDivergedError,)) or type(e).__module__.startswith(("steer_heal", "reward")):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
