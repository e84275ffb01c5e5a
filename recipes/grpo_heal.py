"""Online GRPO heal: steered rollouts, RMSE reverse-KL penalty, periodic bakes.

    accelerate launch recipes/grpo_heal.py --config recipes/configs/grpo_demo_cpu.yaml [--key value ...]
    python recipes/grpo_heal.py --config recipes/configs/grpo_smoke.yaml --max_steps 8
    python recipes/grpo_heal.py --config ... --resume_from_checkpoint runs/<dir>/checkpoint-4

YAML + CLI are parsed by trl.TrlParser into (OnlineConfig, GRPOConfig): steer-heal's settings (the same
declarations as the iterative loop's, flat) and TRL's.
"""
import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is the documented hook we use
from steer_heal.console import quiet_startup  # noqa: E402

quiet_startup()  # before TRL imports vLLM / DeepSpeed
from trl import GRPOConfig, TrlParser  # noqa: E402

from steer_heal.config import from_flat  # noqa: E402
from steer_heal.errors import one_line_errors  # noqa: E402
from steer_heal.grpo.online import OnlineConfig, OnlineRun  # noqa: E402
from steer_heal.rundir import BAKE_COLUMNS, format_table  # noqa: E402
from steer_heal.setting import read_yaml  # noqa: E402


def main() -> int:
    return one_line_errors(_main)


def _main() -> int:
    if "--config" in sys.argv[:-1]:  # a YAML syntax error is one line with the file and line, not TRL's traceback
        read_yaml(sys.argv[sys.argv.index("--config") + 1])
    flat, args = TrlParser((OnlineConfig, GRPOConfig)).parse_args_and_config()
    if args.beta != 0.0:
        raise SystemExit("error: GRPOConfig.beta must be 0 (steer-heal's RMSE barrier replaces TRL's KL); "
                         "fix: set kl_beta instead")
    run = OnlineRun(from_flat(flat), args)
    run.setup(args.resume_from_checkpoint)
    if run.finished:
        print(f"{args.resume_from_checkpoint}: the run had reached budget_tokens at this bake; nothing left to train")
    else:
        trainer = run.trainer()
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if run.cfg.online.dump_rank_weights:
        run.dump_rank_weights()
    if run.main:
        print("\nbake table\n" + format_table(run.rd.rows(), columns=BAKE_COLUMNS))
        print(f"done: {run.rd.path}/bake_table.md, {run.rd.path}/bakes.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
