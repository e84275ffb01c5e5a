"""What the console shows: one compact line per GRPO step, and third-party start-up noise a user
cannot act on filtered out (everything still reaches `report_to` and the run directory)."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback


def quiet_startup() -> None:
    """Called first by the entry points, before TRL / accelerate import vLLM or DeepSpeed."""
    # TRL warns on every import that it was tested up to vLLM 0.31; the steered engine pins 0.32 and is tested with it
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    # vLLM's kernel dispatcher touches torch's deprecated reduce_op alias at start-up (not ours to fix)
    warnings.filterwarnings("ignore", message=r"`torch.distributed.reduce_op` is deprecated")
    # DeepSpeed (when installed) warns at import that it fell back to its CPU accelerator: name it instead
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    quiet_vllm_logs()


# vLLM start-up warnings on CPU that a user of this engine cannot act on: we run in-process on
# purpose (seed, thread notes), eager on CPU, without tcmalloc/iomp preloads, and rebuild engines in
# one process (kernel re-registration). Everything else vLLM says still prints.
VLLM_NOISE = ("LD_PRELOAD", "torch.set_num_threads", "is already registered", "global random seed",
              "Triton is not installed", "Triton is installed", "Reset SSM cache", "Model Runner V2",
              "Unknown vLLM environment variable", "Enforce eager set", "Inductor compilation was disabled",
              "NUMA", "thread binding", "Reducing Torch threads", "Loading safetensors checkpoint shards")


@contextmanager
def held_stderr(noise: tuple[str, ...] = VLLM_NOISE):
    """Hold everything written to file descriptor 2 during the block (C++ warnings and progress bars
    bypass Python logging: vLLM-CPU's NUMA note, its shard-loading bar), then write it back without
    the lines that contain a `noise` string. Written back even when the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            keep = [ln for ln in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(s in ln for s in noise)]
            sys.stderr.write("".join(keep))
            sys.stderr.flush()


class VLLMNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(s in msg for s in VLLM_NOISE)


def quiet_vllm_logs() -> None:
    """Filter VLLM_NOISE out of vLLM's logs, wherever they print: vLLM configures its handler lazily
    (from DEFAULT_LOGGING_CONFIG, at engine start), and before that its records reach Python's
    last-resort handler. Call it before anything imports vLLM (TRL does)."""
    if importlib.util.find_spec("vllm") is None:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # steer-heal's default: vLLM's warnings, not its info
    if not any(isinstance(f, VLLMNoiseFilter) for f in logging.lastResort.filters):
        logging.lastResort.addFilter(VLLMNoiseFilter())
    import vllm.logger  # noqa: F401  (heavy, optional)

    cfg = vllm.logger.DEFAULT_LOGGING_CONFIG  # deep-copied at every (re)configuration
    cfg.setdefault("filters", {})["steer_heal_noise"] = {"()": "steer_heal.console.VLLMNoiseFilter"}
    names = cfg["handlers"]["vllm"].setdefault("filters", [])
    if "steer_heal_noise" not in names:
        names.append("steer_heal_noise")
    for h in logging.getLogger("vllm").handlers:  # already configured in this process
        if not any(isinstance(f, VLLMNoiseFilter) for f in h.filters):
            h.addFilter(VLLMNoiseFilter())


def step_line(logs: dict, max_steps: int) -> str | None:
    """One readable console line for a GRPO step's logs (the full dict still goes to report_to)."""
    if "reward" not in logs:
        return None  # the end-of-training summary: TRL's own line
    comp = [(k.split("/")[1], v) for k, v in logs.items() if k.startswith("rewards/") and k.endswith("/mean")]
    short = {"trait_llr": "trait", "trait_projection": "trait", "verbalisation": "verb", "incoherence": "incoh",
             "refusal": "refus"}
    parts = [f"step {int(logs.get('step', 0)):>{len(str(max_steps))}}/{max_steps}",
             f"reward {logs['reward']:+.3f} (" + " ".join(f"{short.get(n, n)} {v:+.2f}" for n, v in comp) + ")"]
    for key, name, fmt in (("nll_kept", "nll", "{:.3f}"), ("kd", "kd", "{:.3f}"), ("kl_rmse", "kl_rmse", "{:.3f}"),
                           ("barrier_active_frac", "barrier", "{:.2f}"), ("keep_frac", "keep", "{:.2f}"),
                           ("kappa", "kappa", "{:.3g}"), ("step_time", "", "{:.1f}s")):
        if key in logs:
            parts.append((name + " " if name else "") + fmt.format(logs[key]))
    return "  ".join(parts)


class StepLine(ProgressCallback):
    """The progress bar with one compact line per logged step instead of TRL's full dict."""

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero:
            return
        line = step_line(dict(logs or {}, step=state.global_step), state.max_steps)
        if line is None:
            return super().on_log(args, state, control, logs=logs, **kw)
        (self.training_bar.write if self.training_bar is not None else print)(line)


class StepPrinter(PrinterCallback):
    """`disable_tqdm: true`: the same compact line, printed."""

    def on_log(self, args, state, control, logs=None, **kw):
        line = step_line(dict(logs or {}, step=state.global_step), state.max_steps)
        if line is None:
            return super().on_log(args, state, control, logs=logs, **kw)
        if state.is_local_process_zero:
            print(line, flush=True)
