"""steer-heal: distil a steering vector into LoRA weights and heal the incoherence it causes.

commands:
  run      the iterative steer -> filter -> heal -> bake loop (the seed's loop)
  export   a merged model from a run, loadable with plain transformers
  eval     the moral-foundations forced-choice evaluation (tinymfv protocol)
  score    score completions with the reward components; --validate prints judge AUROCs
  compare  arms side by side at a matched generated-token budget, with verdicts
  preset   `preset new NAME --pos ... --neg ...` writes a preset; `preset check FILE` lists its problems

The online GRPO heal runs as `accelerate launch recipes/grpo_heal.py --config ...`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version
from pathlib import Path

# torch, transformers and the library are imported inside each command: `--help` answers at once

def _run(args) -> int:
    import yaml

    from steer_heal.config import apply_dict, config_from_dict, load_config, parse_overrides
    from steer_heal.loop import run
    if args.resume:
        cfg_file = Path(args.resume) / "config.yaml"
        if not cfg_file.exists():
            raise SystemExit(f"error: '{args.resume}' has no config.yaml; fix: pass the folder of an earlier run")
        cfg = load_config(args.config, args.overrides) if args.config else config_from_dict(
            yaml.safe_load(cfg_file.read_text()))
        if not args.config and args.overrides:
            apply_dict(cfg, parse_overrides(args.overrides))
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
    import yaml

    from steer_heal.models import resolve_model_path
    from steer_heal.student import export_merged
    d = Path(args.run_dir)
    cum = d / _pick_record(d, args.round).adapter
    cfg = yaml.safe_load((d / "config.yaml").read_text())

    out = Path(args.out or d / f"merged_{cum.parent.name}")
    export_merged(resolve_model_path(cfg["model"]["model"]), cum, out)
    print(f"exported {cum.parent.name} merged model to {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0


def _pick_record(d: Path, index: int | None):
    """The round (loop) or bake (online run) `index` of run directory d, the last by default."""
    from steer_heal.rundir import RunDirError, read_records
    recs = read_records(d)
    if not recs:
        raise RunDirError(f"'{d}' has no completed round or bake; fix: pass a run directory with rounds.jsonl or "
                          "bakes.jsonl")
    pick = recs[-1] if index is None else next((r for r in recs if r.index == index), None)
    if pick is None:
        raise RunDirError(f"'{d}' has no round / bake {index}; fix: pass --round in {[r.index for r in recs]}")
    return pick


def _eval(args) -> int:
    import yaml
    from peft import PeftModel

    from steer_heal.evals.mfv import evaluate_mfv, format_profile
    from steer_heal.evals.mfv_data import load_vignettes
    from steer_heal.models import load_model
    from steer_heal.steering import Steering, SteeringVector
    model_id, adapter = args.model, args.adapter
    if args.run:
        d = Path(args.run)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        model_id = model_id or cfg["model"]["model"]

        adapter = str(d / _pick_record(d, args.round).adapter)
    if not model_id:
        raise SystemExit("error: no model; fix: pass --model ID (or --run RUN_DIR)")
    lm = load_model(model_id, dtype=args.dtype)
    model = lm.model
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    steering = None
    if args.steer:
        steering = Steering(SteeringVector.load(args.steer), args.coeff)
    vig = load_vignettes(args.mfv_dir, args.mfv_config, args.condition, args.n or None, args.seed)
    res = evaluate_mfv(model, lm.tokenizer, vig, args.think, args.batch_size, steering, read=args.read)
    what = model_id + (f" + {adapter}" if adapter else "") + (f" steered c={args.coeff}" if steering else "")
    print(f"MFV {args.mfv_config}/{args.condition}: {what}")
    print(format_profile(res))
    out = Path(args.out or "mfv_eval.json")
    out.write_text(json.dumps(dict(model=model_id, adapter=adapter, steer=args.steer, coeff=args.coeff,
                                   summary=res.summary(), rows=res.rows), indent=1))
    print(f"wrote {out}")
    return 0


def _score(args) -> int:
    from reward import RewardConfig
    from reward.components import preset_scorer
    from reward.validation import load_labelled, means_by_label, report, score_labelled
    from steer_heal.models import load_model, num_layers
    from steer_heal.presets import load_preset
    from steer_heal.steering import extract_vector, layer_band
    if not (args.validate or args.file):
        raise SystemExit("error: nothing to score; fix: pass --file completions.jsonl or --validate")
    p = None if args.validate else load_preset(args.preset)  # a bad preset is refused before the model loads
    lm = load_model(args.model, dtype=args.dtype)
    if args.validate:
        lines = ["| preset | component | target | vs | AUROC |", "|---|---|---|---|---|"]

        for preset, items in load_labelled().items():
            p = load_preset(preset)
            v = extract_vector(lm.model, lm.tokenizer, p.persona_pos, p.persona_neg, p.contexts[:64],
                               layer_band(num_layers(lm.model)))  # for trait_projection
            sc = preset_scorer(lm.model, lm.tokenizer, p, RewardConfig(), vector=v, batch_size=64)
            comp = score_labelled(sc, items, which=["trait_llr", "trait_projection", "incoherence", "verbalisation",
                                                    "refusal"])
            for r in report(comp, [x["label"] for x in items]):
                lines.append(f"| {preset} | {r['component']} | {r['target']} | {r['vs']} | {r['auroc']:.3f} |")
        text = "\n".join(lines)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(f"reward validation on {args.model}\n\n{text}\n")
        return 0
    items = [json.loads(x) for x in Path(args.file).read_text().splitlines() if x.strip()]
    items = [dict(prompt=x.get("prompt") or x.get("user"), reply=x.get("completion") or x.get("reply") or x.get("text"),
                  label=x.get("label", "all")) for x in items]
    sc = preset_scorer(lm.model, lm.tokenizer, p, RewardConfig(), batch_size=64)
    comp = score_labelled(sc, items, which=["trait_llr", "incoherence", "verbalisation", "refusal"])
    comp["combined"] = sc.combined(comp)
    means = means_by_label(comp, [x["label"] for x in items])
    keys = ["trait_llr", "incoherence", "verbalisation", "refusal", "tail_nll", "repetition", "combined"]
    print(f"{'label':<12} {'n':>4} " + " ".join(f"{k:>13}" for k in keys))
    for lab, m in means.items():
        n = sum(x["label"] == lab for x in items)
        print(f"{lab:<12} {n:>4} " + " ".join(f"{m[k]:>13.3f}" for k in keys))
    return 0


def _compare(args) -> int:
    from steer_heal.study.config import CompareError, load_compare
    from steer_heal.study.driver import merge_study, report_from, run_compare

    cfg = load_compare(args.config, args.overrides)
    if args.merge_from and not args.report_only:
        raise CompareError("--merge-from needs --report-only DIR (the study folder it merges into)")
    if args.merge_from:
        for line in merge_study(Path(args.merge_from), Path(args.report_only)):
            print(f"[compare] {line} (from {args.merge_from})")
    if args.report_only:
        report_from(cfg, Path(args.report_only))
        print(f"done: {args.report_only}/compare.md, {args.report_only}/verdicts.json (from its compare.jsonl)")
        return 0
    run_compare(cfg, [a for a in args.arms.split(",") if a] or None, train_only=args.train_only)
    if args.train_only:
        print(f"trained: {cfg.dir} (evaluate and report: the same command without --train-only)")
        return 0
    print(f"done: {cfg.dir}/compare.md, {cfg.dir}/frontier.png, {cfg.dir}/answers.html")
    return 0


def _preset(args) -> int:
    from steer_heal.presets import PresetError, defaults_line, load_preset, skeleton
    from steer_heal.presets.check import check_preset

    if args.action == "new":
        out = Path(args.out or f"{args.name}.yaml")
        if out.exists() and not args.force:
            raise PresetError(f"{out} exists; fix: pass --out <another file> or --force")
        out.write_text(skeleton(args.name, args.pos, args.neg))
        print(f"wrote {out}: fill it in, then `steer-heal preset check {out}`")
        return 0
    p = load_preset(args.file, check=False)
    problems = check_preset(p)
    for line in problems:
        print(f"{args.file}: {line}")
    if problems:
        return 1
    print(f"ok: {args.file} (persona pair, {len(p.contexts)} contexts, {len(p.prompts)} training prompts, "
          f"{len(p.dev_prompts)} dev, {len(p.test_prompts)} test; MFV axis {p.foundations or 'none'}; held-out judge "
          f"{'yes' if p.eval_persona_pos else 'none'})")
    if line := defaults_line(p):
        print(line)
    return 0


def version() -> str:
    try:
        return _pkg_version("steer-heal")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steer-heal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"steer-heal {version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the iterative steer -> filter -> heal -> bake loop")
    r.add_argument("--config", help="YAML config (recipes/configs/*.yaml)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue after the last completed round of RUN_DIR")
    r.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. heal.kl_beta=0.3 rounds=4")
    e = sub.add_parser("export", help="write a merged model that loads with plain transformers")
    e.add_argument("run_dir")
    e.add_argument("--round", type=int, default=None, help="round (loop) or bake (online run); default: the last")
    e.add_argument("--out", default=None)
    v = sub.add_parser("eval", help="moral-foundations forced-choice evaluation (tinymfv protocol)")
    v.add_argument("--model", default=None, help="hub id or folder (default: the run's model)")
    g = v.add_mutually_exclusive_group()
    g.add_argument("--adapter", default=None, help="a PEFT adapter folder to merge first")
    g.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="evaluate a run's baked student (loop or online run; with --round)")
    v.add_argument("--round", type=int, default=None, help="round / bake of --run (default: the last)")
    v.add_argument("--steer", default=None, metavar="VECTOR", help="steering vector .safetensors")
    v.add_argument("--coeff", type=float, default=1.0)
    v.add_argument("--mfv-dir", default=None, help="vignettes folder (default $STEER_HEAL_MFV_DIR, then the hub)")
    v.add_argument("--mfv-config", default="classic", choices=["classic", "scifi", "ai-actor"])
    v.add_argument("--condition", default="other_violate", choices=["other_violate", "self_violate"])
    v.add_argument("--n", type=int, default=0, help="stratified subset size (0: all)")
    v.add_argument("--think", type=int, default=64, help="think tokens T (128 for headline numbers)")
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--read", default="tinymfv", choices=["tinymfv", "exact"],
                   help="answer pass: tinymfv's (default, comparable with its tables) or exact (see README)")
    v.add_argument("--dtype", default="auto")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default=None, help="JSON output (default mfv_eval.json)")
    sc = sub.add_parser("score", help="score completions with the reward components (means by label)")
    sc.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="the reference model")
    sc.add_argument("--file", help="JSONL with prompt (the user turn), completion, optional label")
    sc.add_argument("--preset", default="care-over-authority")
    sc.add_argument("--validate", action="store_true", help="AUROC of each component on the labelled set")
    sc.add_argument("--out", default=None, help="with --validate: write the report here (markdown)")
    sc.add_argument("--dtype", default="auto")
    c = sub.add_parser("compare", help="arms side by side at a matched generated-token budget (one table, a frontier)")
    c.add_argument("--config", required=True, help="recipes/compare/<name>.yaml")
    c.add_argument("--arms", default="", help="comma-separated subset of the config's arms")
    c.add_argument("--report-only", metavar="DIR", default="",
                   help="rebuild the report in DIR from DIR/compare.jsonl and DIR/judges.json alone (no model; e.g. "
                        "a study committed under docs/studies/)")
    c.add_argument("--merge-from", metavar="RUN_DIR", default="",
                   help="with --report-only DIR: first merge RUN_DIR's rows (another run of the same study, e.g. arms "
                        "added in a fresh runs/ folder) into DIR/compare.jsonl, replacing the same arm x seed")
    c.add_argument("--train-only", action="store_true",
                   help="train the selected arms and stop (evaluate and report later, e.g. after a code change)")
    c.add_argument("overrides", nargs="*", help="key=value overrides of the comparison config, e.g. budget_tokens=4000")
    pr = sub.add_parser("preset", help="check a preset, or write a new one (your own trait from a persona pair)")
    pa = pr.add_subparsers(dest="action", required=True)
    pc = pa.add_parser("check", help="every problem of a preset, one line each (exit 1 if any)")
    pc.add_argument("file", help="a preset YAML (or a shipped preset's name)")
    pn = pa.add_parser("new", help="write a commented skeleton that passes `preset check` as written")
    pn.add_argument("name")
    pn.add_argument("--pos", required=True, help="the positive persona, e.g. 'You are someone who ...'")
    pn.add_argument("--neg", required=True, help="the opposite pole, the same length and style, in its own words")
    pn.add_argument("--out", default=None, help="where to write it (default NAME.yaml)")
    pn.add_argument("--force", action="store_true", help="overwrite an existing file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from steer_heal.errors import one_line_errors

    if args.cmd == "preset":  # no model, no torch
        return one_line_errors(_preset, args)
    from steer_heal.console import quiet_startup  # imports torch: after argparse has answered --help

    quiet_startup()
    cmd = {"run": _run, "export": _export, "eval": _eval, "score": _score, "compare": _compare}[args.cmd]
    return one_line_errors(cmd, args)

if __name__ == "__main__":
    sys.exit(main())
