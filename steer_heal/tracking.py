"""Metrics to the tracker the user picks (`report_to`); always also to the run directory."""
from __future__ import annotations


class Tracker:
    def __init__(self, report_to: list[str], run_dir, config: dict):
        self.backends = []
        for name in report_to or []:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.backends.append(("tb", SummaryWriter(str(run_dir / "tb"))))
            elif name == "wandb":
                import wandb

                self.backends.append(("wandb", wandb.init(config=config, dir=str(run_dir))))
            elif name not in ("none", ""):
                raise ValueError(f"unknown report_to '{name}'; fix: use tensorboard, wandb or none")
        self._step = 0

    def log(self, metrics: dict, step: int | None = None) -> None:
        step = self._step if step is None else step
        self._step += 1
        num = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        for kind, b in self.backends:
            if kind == "tb":
                for k, v in num.items():
                    b.add_scalar(k, v, step)
            else:
                b.log(num)

    def close(self) -> None:
        for kind, b in self.backends:
            b.close() if kind == "tb" else b.finish()
