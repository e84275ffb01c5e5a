"""Online GRPO heal: steered rollouts, RMSE reverse-KL penalty, periodic bakes.

    accelerate launch recipes/grpo_heal.py --config recipes/configs/grpo_demo_cpu.yaml [--key value ...]
    python recipes/grpo_heal.py --config recipes/configs/grpo_smoke.yaml --max_steps 8
    python recipes/grpo_heal.py --config ... --resume_from_checkpoint runs/<dir>/checkpoint-4

YAML + CLI are parsed by trl.TrlParser into (OnlineConfig, GRPOConfig): steer-heal's knobs and TRL's.
"""
import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is the documented hook we use

from trl import GRPOConfig, TrlParser  # noqa: E402

from steer_heal.grpo.online import OnlineConfig, OnlineRun  # noqa: E402


def main() -> int:
    try:
        return _main()
    except (ValueError, RuntimeError, OSError) as e:  # ours carry their fix: one line, no trace
        if type(e).__module__.startswith(("steer_heal", "reward")):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def _main() -> int:
    cfg, args = TrlParser((OnlineConfig, GRPOConfig)).parse_args_and_config()
    if args.beta != 0.0:
        raise SystemExit("error: GRPOConfig.beta must be 0 (steer-heal's RMSE barrier replaces TRL's KL); "
                         "fix: set kl_beta instead")
    cfg.run_dir = cfg.run_dir or args.output_dir
    run = OnlineRun(cfg, args, seed=args.seed)
    run.setup(args.resume_from_checkpoint)
    trainer = run.trainer()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if cfg.dump_rank_weights:
        run.dump_rank_weights()
    if run.main:
        from steer_heal.grpo.online import BAKE_COLUMNS
        from steer_heal.rundir import format_table

        print("\nbake table\n" + format_table(run.rd.rows(), columns=BAKE_COLUMNS))
        print(f"done: {run.rd.path}/bake_table.md, {run.rd.path}/bakes.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
