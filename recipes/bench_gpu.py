"""GPU rows the CPU bench cannot give: heal and online-step time and peak memory at a real 4B model's
shapes (random weights from the architecture's published config: nothing from the hub), and the ZeRO-2
launcher in bf16.

    python recipes/bench_gpu.py --shape qwen3-4b --out runs/bench_gpu          # on a CUDA machine
    python recipes/bench_gpu.py --shape tiny --device cpu --out /tmp/bg       # this script's own check, seconds

Random weights give the real compute and memory of every step (the shapes are the model's), not its
text: the tokenizer is the tiny test tokenizer (512 tokens), so replies are random ids.
Rows go to <out>/bench_gpu.json and print as the bench's table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen3Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))

from bench import _demo_steps, print_table  # noqa: E402

from steer_heal.config import HealConfig  # noqa: E402
from steer_heal.heal import heal_round  # noqa: E402
from steer_heal.models import load_model  # noqa: E402
from steer_heal.student import Student  # noqa: E402
from steer_heal.tiny import _train_tokenizer  # noqa: E402

# the bodies of the published config.json files (the tokenizer is the tiny one): (config class, fields)
SHAPES = {
    "qwen3-4b": (Qwen3Config, dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                   max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True)),
    "qwen3-8b": (Qwen3Config, dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                   max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=False)),
    # google/gemma-3-4b-it's text_config: a 262k vocabulary, the exact KL's hardest case
    "gemma3-4b": (Gemma3TextConfig, dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                         vocab_size=262208, sliding_window=1024, max_position_embeddings=131072,
                                         rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "tiny": (Qwen3Config, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=32, vocab_size=512, max_position_embeddings=2048,
                               tie_word_embeddings=True)),
}


def build(shape: str, out: Path, device: str) -> Path:
    """Random weights at `shape`, saved in bf16 (fp32 on CPU) with the tiny tokenizer."""
    if (out / "config.json").exists():
        return out
    tok = _train_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    cls, fields = SHAPES[shape]
    cfg = cls(eos_token_id=eos, pad_token_id=eos, bos_token_id=None, **fields)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    gc.collect()
    return out


def _peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else float("nan")


def bench_heal(path: Path, device: str, n: int, prompt_len: int, completion_len: int) -> list[dict]:
    """One heal epoch (NLL + the exact rmse KL barrier against the baked student, chunked) at batch 8 and 1."""
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    lm = load_model(str(path), dtype=dtype, device=device)
    st = Student(lm.model, lm.tokenizer, r=16, alpha=32)
    rng = random.Random(0)
    ex = [([rng.randrange(5, 500) for _ in range(prompt_len)], [rng.randrange(5, 500) for _ in range(completion_len)])
          for _ in range(n)]
    rows, rate = [], {}
    heal_round(st, ex[:8], HealConfig(epochs=1, batch_size=8, val_frac=0.0, log_every=0), progress=False)  # warm
    for bs in (8, 1):
        st.reset_live()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        res = heal_round(st, ex, HealConfig(epochs=1, batch_size=bs, val_frac=0.0, log_every=0), progress=False)
        rate[bs] = res.tokens_per_s
        rows.append(dict(what=f"heal at {path.name} shapes: batch {bs}", value=res.tokens_per_s, unit="tok/s",
                         detail=f"{n} x ({prompt_len} + {completion_len}) tokens, {res.steps} steps, "
                                f"{res.seconds:.1f} s, peak {_peak_gb(device):.1f} GiB"))
    rows.append(dict(what="heal speed-up (batch 8 / batch 1), GPU", value=rate[8] / rate[1], unit="x",
                     detail="target >= 3x"))
    del st, lm
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def bench_online(path: Path, device: str, steps: int, completion_len: int) -> list[dict]:
    """Seconds per online step (HF engine: no vLLM here) for the grpo+nll objective, and its peak memory."""
    extra = ["--engine", "hf", "--objective", "grpo+nll", "--max_completion_length", str(completion_len)]
    if device.startswith("cuda"):
        extra += ["--use_cpu", "false", "--bf16", "true"]
        torch.cuda.reset_peak_memory_stats()
    mean, args = _demo_steps(str(path), steps, *extra)
    n = f"batch {args.per_device_train_batch_size} x {completion_len} tokens, mean of {steps - 1} steps"
    return [dict(what=f"online grpo+nll step at {path.name} shapes: total", value=mean("step_time"), unit="s",
                 detail=f"{n}, peak {_peak_gb(device):.1f} GiB"),
            dict(what="  rollout (steered HF engine)", value=mean("time/rollout"), unit="s", detail=""),
            dict(what="  scoring (reward components)", value=mean("time/scoring"), unit="s", detail=""),
            dict(what="  reference forward (KL barrier)", value=mean("time/ref_forward"), unit="s", detail="")]


def bench_zero2(path: Path, out: Path, steps: int, completion_len: int) -> list[dict]:
    """The ZeRO-2 launcher in bf16 on this machine's GPUs: steps to a bake, wall time, and the bake's files."""
    n_gpu = torch.cuda.device_count()
    run = out / "zero2_run"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_configs/deepspeed_zero2.yaml"), "--num_processes", str(n_gpu),
           str(ROOT / "recipes/grpo_heal.py"), "--config", str(ROOT / "recipes/configs/grpo_demo_cpu.yaml"),
           "--model", str(path), "--engine", "hf", "--use_cpu", "false", "--bf16", "true", "--kappa", "1.0",
           "--max_steps", str(steps), "--bake_every", str(steps), "--save_steps", str(steps), "--mfv", "false",
           "--eval_prompts", "1", "--eval_max_new_tokens", "4", "--max_completion_length", str(completion_len),
           "--objective", "grpo+nll", "--output_dir", str(run)]
    if not Path(cmd[0]).exists():  # an interpreter without the accelerate script beside it
        cmd = [sys.executable, "-m", "accelerate.commands.launch"] + cmd[1:]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    (out / "zero2.log").write_text(p.stdout[-20000:] + "\n" + p.stderr[-20000:])
    bake = run / "bake_00"
    ok = p.returncode == 0 and bake.exists()
    return [dict(what=f"ZeRO-2 bf16, {n_gpu} GPU(s), {steps} steps + a bake", value=dt if ok else float("nan"),
                 unit="s", detail=("wall, model load included; bake files: "
                                   + ", ".join(sorted(x.name for x in bake.iterdir()))) if ok
                 else f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-4b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="runs/bench_gpu")
    ap.add_argument("--heal-examples", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=192)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip", nargs="*", default=[], choices=["heal", "online", "zero2"])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    t = time.perf_counter()
    path = build(a.shape, out / a.shape, a.device)
    rows = [dict(what=f"build + save random {a.shape}", value=time.perf_counter() - t, unit="s",
                 detail=f"{torch.cuda.get_device_name() if a.device.startswith('cuda') else 'cpu'}")]

    def save():  # after each section: a later one that hangs past the caller's limit loses nothing
        (out / "bench_gpu.json").write_text(json.dumps(rows, indent=1))

    for name, fn in (("heal", lambda: bench_heal(path, a.device, a.heal_examples, a.prompt_len, a.completion_len)),
                     ("online", lambda: bench_online(path, a.device, a.steps, a.completion_len)),
                     ("zero2", lambda: bench_zero2(path, out, 2, a.completion_len))):
        if name in a.skip or (name == "zero2" and not a.device.startswith("cuda")):
            continue
        try:
            rows += fn()
        except Exception as e:  # one section's failure is a row; the others still run
            rows.append(dict(what=f"{name}: failed", value=float("nan"), unit="", detail=f"{type(e).__name__}: {e}"))
        save()
    print(print_table(rows, f"bench_gpu ({a.shape})"), flush=True)


if __name__ == "__main__":
    main()
