"""`make bench`: speed and memory on this machine, printed as one table (and bench_out/bench.md).

Rows:
  gen    steered tokens/s: batched HF engine vs the seed's sequential batch-1 generate, same prompts
  vllm   tokens/s of vLLM (in-process, eager on CPU): stock model vs the steerable engine with steering
         off vs steered, same prompts and lengths (EOS held off so every row decodes the same tokens)
  heal   completion tokens/s: default batch vs batch 1, same examples
  mfv    the MFV classic set on the untouched base model; speed-up over tinymfv timed on this machine
  scoring  one GRPO batch's reward components: cached (prefix KV kept) vs uncached
  grpo   seconds per GRPO step, fused vs two-forward update
  engine seconds per whole demo step, HF vs vLLM rollouts (picks the demo's engine)
  opd    seconds per on-policy distillation step, HF vs vLLM
  arm    seconds per study arm: one online arm at the study budget + its final evaluation
  memory peak RSS over the loaded model: NLL-only step vs NLL + chunked exact KL (vs unchunked KL)
Memory rows run in fresh subprocesses so each peak is its own.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

from steer_heal.console import quiet_startup

quiet_startup()  # before TRL imports vLLM: its version warning, once per import, is filtered as in the recipes
from trl import GRPOConfig, TrlParser  # noqa: E402

from reward.components import RewardConfig, preset_scorer  # noqa: E402
from steer_heal.chat import render_prompt  # noqa: E402
from steer_heal.config import HealConfig  # noqa: E402
from steer_heal.engine import HFEngine, Sampling  # noqa: E402
from steer_heal.engine.vllm_engine import (  # noqa: E402
    VLLMConfig,
    VLLMEngine,
    _build_llm,
    engine_memory,
    sampling_params,
    vllm_available,
)
from steer_heal.evals.mfv import evaluate_mfv  # noqa: E402
from steer_heal.evals.mfv_data import load_vignettes  # noqa: E402
from steer_heal.grpo.online import OnlineConfig, OnlineRun  # noqa: E402
from steer_heal.heal import heal_round, heal_terms  # noqa: E402
from steer_heal.logprobs import pack  # noqa: E402
from steer_heal.machine import load_timing  # noqa: E402
from steer_heal.models import DEFAULT_MODEL, load_model  # noqa: E402
from steer_heal.presets import load_preset  # noqa: E402
from steer_heal.steering import Steering, extract_vector, layer_band  # noqa: E402
from steer_heal.student import Student  # noqa: E402
from steer_heal.study.arms import arm_dir, final_adapter, train_arm  # noqa: E402
from steer_heal.study.config import load_compare  # noqa: E402
from steer_heal.study.evaluate import Evaluator  # noqa: E402


def _hf_rates(lm, prompts, steering, samp, batch: int, label: str, n_sequential: int | None = None) -> list[dict]:
    """Steered HF engine tokens/s at `batch` and at batch 1 (on the first `n_sequential` prompts)."""
    rows = []
    for name, bs in ((f"HF batched (batch {batch})", batch), ("HF sequential (batch 1, seed's approach)", 1)):
        eng = HFEngine(lm.model, lm.tokenizer, batch_size=bs)
        eng.generate(prompts[:2], steering, Sampling(max_new_tokens=4, temperature=0.0), logprobs=False)  # warm-up
        ps = prompts if bs > 1 else prompts[:n_sequential]
        t = time.perf_counter()
        ro = eng.generate(ps, steering, samp, logprobs=False)
        dt = time.perf_counter() - t
        n = sum(len(r.completion_ids) for r in ro)
        rows.append(dict(what=label.format(name), value=n / dt, unit="tok/s", detail=f"{n} tokens, {dt:.1f}s"))
        if bs > 1:  # a batch decodes until its longest row ends: the rows that ended earlier ride along
            order = sorted(range(len(ro)), key=lambda i: -len(ro[i].prompt_ids))  # the engine's batches
            steps = sum(len(b) * max(len(ro[i].completion_ids) for i in b)
                        for b in (order[j:j + bs] for j in range(0, len(order), bs)))
            rows.append(dict(what=f"  {name}: tokens kept / row-steps decoded", value=n / steps, unit="x",
                             detail="1.0: every row ran to the same length"))
    return rows


def bench_generation(lm, preset, n_prompts: int, new_tokens: int, batch: int, v) -> list[dict]:
    prompts = [render_prompt(lm.tokenizer, u) for u in (preset.prompts * 4)[:n_prompts]]
    rows = _hf_rates(lm, prompts, Steering(v, 1.0), Sampling(max_new_tokens=new_tokens, temperature=0.0), batch,
                     "steered generation: {}")
    rows.append(
        dict(
            what="steered generation speed-up (batched / sequential)",
            value=rows[0]["value"] / next(r["value"] for r in rows if "sequential" in r["what"]),
            unit="x",
            detail="target >= 8x",
        )
    )
    return rows


def bench_vllm(lm, preset, n_prompts: int, new_tokens: int, v, repeats: int = 3) -> list[dict]:
    """vLLM tokens/s: the stock model (no steering buffers) against the steerable engine, steering off
    and on. One engine at a time, built in the order stock, steerable, steerable, stock (ABBA), each warmed
    on the whole prompt set before it is timed: a first-engine cost or a drift of the machine falls on
    both sides alike, so the ratio measures steering, not build order."""
    from vllm import LLM

    tok = lm.tokenizer
    prompts = [render_prompt(tok, u) for u in (preset.prompts * 4)[:n_prompts]]
    samp = Sampling(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    def timed(gen) -> float:
        gen(prompts)  # warm-up on the timed work itself
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            n = gen(prompts)
            rates.append(n / (time.perf_counter() - t))
        return sorted(rates)[len(rates) // 2]  # median of the repeats

    def stock() -> dict:
        # sized like the project's engine (explicit KV cache on CPU), so it starts beside the loaded model
        llm = _build_llm(LLM, dict(model=lm.path, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                                   **engine_memory(VLLMConfig(), not torch.cuda.is_available())))
        sp = sampling_params(samp, tok, [tok.eos_token_id], False)
        ids = [{"prompt_token_ids": tok(p, add_special_tokens=False).input_ids} for p in prompts]
        r = timed(lambda ps: sum(len(o.outputs[0].token_ids) for o in llm.generate(ids[:len(ps)], sp, use_tqdm=False)))
        return {"vLLM stock model (no steering buffers)": r}  # the engine goes with this frame

    def steerable() -> dict:
        eng = VLLMEngine(lm.path, tok, list(v.layers), VLLMConfig(max_model_len=1024), dtype=torch.float32)
        try:
            return {name: timed(lambda ps, st=st: sum(len(r.completion_ids)
                                                      for r in eng.generate(ps, st, samp, logprobs=False)))
                    for name, st in (("vLLM steerable engine, steering off", None),
                                     ("vLLM steered (c = 1)", Steering(v, 1.0)))}
        finally:
            eng.close()

    got: dict[str, list[float]] = {}
    for build in (stock, steerable, steerable, stock):
        for k, r in build().items():
            got.setdefault(k, []).append(r)
        gc.collect()
    n_tok = len(prompts) * new_tokens
    rows = [dict(what=k, value=sum(rs) / len(rs), unit="tok/s",
                 detail=f"{n_tok} tokens; mean of 2 engines (ABBA), {' / '.join(f'{x:.1f}' for x in rs)}")
            for k, rs in got.items()]
    rows.append(dict(what="vLLM steered / stock", value=rows[2]["value"] / rows[0]["value"], unit="x",
                     detail="target >= 0.9x"))
    # batch 1 is slow: 16 prompts are enough for a rate
    return rows + _hf_rates(lm, prompts, Steering(v, 1.0), samp, n_prompts, "steered {}, same lengths", 16)


def bench_heal(lm, preset, n_examples: int, batch: int) -> list[dict]:
    tok = lm.tokenizer
    eng = HFEngine(lm.model, tok, batch_size=32)
    users = (preset.prompts * 4)[:n_examples]
    ro = eng.generate([render_prompt(tok, u) for u in users], None, Sampling(max_new_tokens=48, seed=0), logprobs=False)
    ex = [(r.prompt_ids, r.completion_ids) for r in ro if r.completion_ids]
    st = Student(lm.model, tok, r=16, alpha=32)
    rows = []
    try:
        # warmed first (the first round in a process pays one-time costs), then batch, 1, 1, batch (ABBA)
        heal_round(st, ex[:batch], HealConfig(epochs=1, batch_size=batch, val_frac=0.0, log_every=0), progress=False)
        got: dict[int, list] = {}
        for bs in (batch, 1, 1, batch):
            st.reset_live()
            res = heal_round(st, ex, HealConfig(epochs=1, batch_size=bs, val_frac=0.0, log_every=0), progress=False)
            got.setdefault(bs, []).append(res)
        for bs, rs in got.items():
            tok_s = sum(r.tokens for r in rs) / sum(r.seconds for r in rs)
            rows.append(dict(what=f"heal (NLL + chunked rmse KL): batch {bs}", value=tok_s, unit="tok/s",
                             detail=f"{rs[0].tokens} completion tokens x 2 rounds, {rs[0].steps} steps a round, "
                                    f"{' / '.join(f'{r.seconds:.1f}' for r in rs)} s"))
    finally:
        st.model.unload()  # the LoRA layers out again: the later sections (MFV, scoring) measure the base model
    rows.append(dict(what="heal speed-up (batch / batch 1)", value=rows[0]["value"] / rows[1]["value"], unit="x",
                     detail="target >= 3x on GPU (docs/performance.md); on this CPU see the two rows below"))
    # why batching cannot pay on a CPU: a matmul at one example's rows already runs at the cores' rate, so
    # batching removes no compute-bound work, and padding to the longest row adds some
    per_ex = sum(len(p) + len(c) for p, c in ex) / len(ex)
    cfg = lm.model.config
    rate = {bs: _matmul_gflops(int(per_ex * bs), cfg.hidden_size, cfg.intermediate_size) for bs in (1, batch)}
    rows.append(dict(what=f"matmul rate at batch {batch}'s rows / batch 1's", value=rate[batch] / rate[1], unit="x",
                     detail=f"{rate[batch]:.0f} / {rate[1]:.0f} GFLOP/s, [{int(per_ex * batch)} or {int(per_ex)} x "
                            f"{cfg.hidden_size}] @ [{cfg.hidden_size} x {cfg.intermediate_size}]"))
    rng = random.Random(0)
    padded = sum(len(b) * max(len(p) + len(c) for p, c in b) for b in
                 (lambda xs: [xs[i:i + batch] for i in range(0, len(xs), batch)])(rng.sample(ex, len(ex))))
    rows.append(dict(what=f"heal batch {batch}: padded tokens / real tokens", value=padded / (per_ex * len(ex)),
                     unit="x", detail="the work batching adds on a compute-bound machine"))
    return rows


def _matmul_gflops(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm-up
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def _mem_child(model: str, mode: str, n_seq: int, seq_len: int) -> dict:
    """Run in a fresh process: peak RSS growth of one training step in `mode`."""
    lm = load_model(model, dtype="float32")
    st = Student(lm.model, lm.tokenizer, r=16, alpha=32)
    g = torch.Generator().manual_seed(0)
    V = lm.model.config.vocab_size
    ex = [([1] * 8, torch.randint(3, min(V, 30000), (seq_len,), generator=g).tolist()) for _ in range(n_seq)]
    batch = pack([e[0] for e in ex], [e[1] for e in ex], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        lm.model(input_ids=batch.input_ids[:1, :8])

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed load-time memory back so RSS starts low
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page  # noqa: E731
    base, peak, stop = rss(), [0], threading.Event()

    def sample():  # ru_maxrss would report the loading peak; sample the step's own RSS instead
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    if mode == "nll":  # the usual HF step: full logits, cross-entropy
        labels = batch.input_ids.masked_fill(batch.completion_mask == 0, -100)
        loss = st.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    else:
        cfg = HealConfig(kl_chunk_tokens=0 if mode == "kl_chunked" else 10 ** 9)
        nll, D, bar, k, _ = heal_terms(st, batch, cfg, st.live_off)
        loss = nll + 0.3 * (D - 0.0).mean()  # barrier always active: KL gradient flows
    loss.backward()
    stop.set()
    th.join()
    return dict(peak_mb=(peak[0] - base) / 2 ** 20, seconds=time.perf_counter() - t, vocab=V)


def bench_memory(model: str, label: str, n_seq: int, seq_len: int) -> list[dict]:
    rows = []
    for mode, name in (("nll", "NLL-only step (HF full logits)"), ("kl_chunked", "NLL + exact KL, chunked"),
                       ("kl_unchunked", "NLL + exact KL, unchunked")):
        out = subprocess.run([sys.executable, __file__, "--mem-child", model, mode, str(n_seq), str(seq_len)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            rows.append(dict(what=f"memory {label}: {name}", value=float("nan"), unit="MB", detail=out.stderr[-200:]))
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(dict(what=f"peak memory {label}: {name}", value=r["peak_mb"], unit="MB over model",
                         detail=f"{n_seq}x{seq_len} completion tokens, vocab {r['vocab']}, {r['seconds']:.1f}s"))
    return rows


def _tinymfv_seconds(model_path: str, n: int, think: int) -> dict | None:
    """tinymfv's own `evaluate` (pinned commit, batch 1) on the same stratified subset, in a child process
    whose PYTHONPATH holds its source ($TINYMFV_PATH, set by `make bench`); None where it is not there."""
    path = os.environ.get("TINYMFV_PATH")
    if not path:
        return None
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run([sys.executable, str(ROOT / "tests/fixtures/make_tinymfv_fixture.py"), "--model", model_path,
                          "--vignettes", os.environ.get("STEER_HEAL_MFV_DIR", ""), "--n", str(n), "--think",
                          str(think), "--time"], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"tinymfv's evaluate failed: {out.stderr.strip().splitlines()[-1:]}")
    text = out.stdout
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def bench_mfv(lm, think: int, batch: int, n_sub: int = 44, full_set: bool = True) -> list[dict]:
    """steer-heal's MFV on the full classic set (information), and the speed-up over tinymfv's own
    evaluator measured in this run, both on one stratified subset (both frames): the ratio of two
    timings taken minutes apart on one machine, not against a stored time from another day."""
    rows = load_vignettes(None, "classic", "other_violate")
    out = []
    if full_set:
        t = time.perf_counter()
        res = evaluate_mfv(lm.model, lm.tokenizer, rows, think_tokens=think, batch_size=batch, progress=False)
        dt = time.perf_counter() - t
        n_tok = 2 * len(rows) * think
        out = [dict(what=f"MFV classic ({len(rows)} x 2 frames, T={think}): wall time", value=dt, unit="s",
                    detail=f"batch {batch}; pmass {res.pmass_allowed:.3f}, nll_prefill {res.nll_prefill:.3f}"),
               dict(what="MFV think tokens/s", value=n_tok / dt, unit="tok/s", detail=f"{n_tok} generated tokens")]
    full = load_timing("tinymfv_classic")  # the full set's tinymfv time, if one was taken here: information only
    if full and full.get("n") == len(rows) and full.get("think_tokens") == think:
        out.append(dict(what="  tinymfv's own evaluate on the full set (stored; information)", value=full["seconds"],
                        unit="s", detail=f"{full['date']}, another day: not a ratio's denominator"))
    ref = _tinymfv_seconds(lm.path, n_sub, think)
    if ref is None:
        out.append(dict(what="MFV speed-up vs tinymfv's own evaluate (batch 1)", value=float("nan"), unit="x",
                        detail="tinymfv not set up; fix: run `make bench` (it fetches tinymfv at the pinned commit)"))
        return out
    sub = load_vignettes(None, "classic", "other_violate", n_sub, 0)
    # warm on one batch of its own size first, as tinymfv's timing is warmed on one of its own (batch 1)
    evaluate_mfv(lm.model, lm.tokenizer, sub[:max(1, batch // 2)], think_tokens=think, batch_size=batch, progress=False)
    t = time.perf_counter()
    mine = evaluate_mfv(lm.model, lm.tokenizer, sub, think_tokens=think, batch_size=batch, progress=False)
    dt_sub = time.perf_counter() - t
    out += [dict(what=f"MFV subset ({n_sub} x 2 frames): tinymfv's own evaluate, batch 1", value=ref["seconds"],
                 unit="s", detail=f"pinned commit; pmass {ref['pmass_allowed']:.3f}"),
            dict(what=f"MFV subset ({n_sub} x 2 frames): steer-heal, batch {batch}", value=dt_sub, unit="s",
                 detail=f"pmass {mine.pmass_allowed:.3f}"),
            dict(what="MFV speed-up vs tinymfv's own evaluate (same subset, same run)", value=ref["seconds"] / dt_sub,
                 unit="x", detail="goal >= 4x; both warmed on one batch of their own size")]
    # where the time goes: with one think token the run is the prompts' prefill (+ the answer pass), work
    # tinymfv does at the same cost (fp32 GEMMs on all cores); batching can only shrink the rest
    t = time.perf_counter()
    evaluate_mfv(lm.model, lm.tokenizer, sub, think_tokens=1, batch_size=batch, progress=False)
    dt_pre = time.perf_counter() - t
    out += [dict(what="  MFV subset with 1 think token (prefill + answer pass)", value=dt_pre, unit="s",
                 detail=f"{dt_pre / dt_sub:.0%} of the T={think} run: the part batching cannot shrink"),
            dict(what="  ceiling of the speed-up (tinymfv / prefill + answer pass)", value=ref["seconds"] / dt_pre,
                 unit="x", detail="if the think tokens cost nothing")]
    # the same subset in bf16 (information: on a CPU with AMX the prefill GEMMs run several times faster; the
    # numbers move, so the study evaluations stay fp32 on CPU)
    m16 = copy.deepcopy(lm.model).to(torch.bfloat16)
    evaluate_mfv(m16, lm.tokenizer, sub[:max(1, batch // 2)], think_tokens=think, batch_size=batch, progress=False)
    t = time.perf_counter()
    r16 = evaluate_mfv(m16, lm.tokenizer, sub, think_tokens=think, batch_size=batch, progress=False)
    dt16 = time.perf_counter() - t
    del m16
    out.append(dict(what=f"  MFV subset in bf16, batch {batch} (information)", value=dt16, unit="s",
                    detail=f"{dt_sub / dt16:.2f}x fp32; pmass {r16.pmass_allowed:.4f} vs fp32 "
                           f"{mine.pmass_allowed:.4f}"))
    return out


ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "recipes/configs/grpo_demo_cpu.yaml"


def _demo_engine() -> str:
    return yaml.safe_load(Path(DEMO_CONFIG).read_text()).get("engine", "hf")


def _demo_steps(model: str, steps: int, *extra: str):
    """`steps` steps of the online demo config (no bake, no MFV, dose fixed); returns (mean of a logged
    key over the steps after the first, the GRPOConfig)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cfg, args = TrlParser((OnlineConfig, GRPOConfig)).parse_args_and_config(
        args=["--config", DEMO_CONFIG, "--model", model, "--output_dir",
              tempfile.mkdtemp(prefix="bench_online_"), "--max_steps", str(steps), "--bake_every", "1000",
              "--mfv", "false", "--save_strategy", "no", "--kappa", "1.0", "--disable_tqdm", "true",
              "--eval_prompts", "1", "--eval_max_new_tokens", "4", *extra])
    run = OnlineRun(cfg, args, seed=args.seed)
    run.setup()
    tr = run.trainer()
    tr.train()
    run.engine.sleep()
    hist = [h for h in tr.state.log_history if "step_time" in h][1:]  # drop the warm-up step
    return (lambda k: sum(float(h.get(k, 0.0)) for h in hist) / max(len(hist), 1)), args


def bench_grpo(model: str, steps: int = 4) -> list[dict]:
    """Seconds per GRPO step on the demo config (objective grpo, the only one with a second forward to
    fuse), split into rollout, scoring, reference forward and the rest ("update": student forward,
    backward, optimizer), for the fused path (one student forward per micro-batch) next to the
    two-forward path (TRL's own logprob forward + a separate forward for the penalty)."""
    rows, upd = [], {}
    for fused in (True, False):
        mean, args = _demo_steps(model, steps, "--objective", "grpo", "--fused", str(fused).lower())
        total, ro, sc, ref = mean("step_time"), mean("time/rollout"), mean("time/scoring"), mean("time/ref_forward")
        upd[fused] = total - ro - sc - ref
        tag = "fused, 1 student forward" if fused else "two forwards (TRL + penalty)"
        n = f"batch {args.per_device_train_batch_size} completions x {args.max_completion_length} tokens"
        rows += [
            dict(what=f"GRPO step [{tag}]: total", value=total, unit="s", detail=f"{n}, mean of {steps - 1} steps"),
            dict(what=f"GRPO step [{tag}]: rollout (steered {_demo_engine()} engine)", value=ro, unit="s", detail=""),
            dict(what=f"GRPO step [{tag}]: scoring (reward components)", value=sc, unit="s", detail=""),
            dict(what=f"GRPO step [{tag}]: reference forward (KL penalty)", value=ref, unit="s", detail=""),
            dict(
                what=f"GRPO step [{tag}]: update (student forward, backward, optimizer)",
                value=upd[fused],
                unit="s",
                detail="",
            ),
        ]
    rows.append(dict(what="GRPO update time, fused / two-forward", value=upd[True] / max(upd[False], 1e-9), unit="x",
                     detail="target <= 0.65x"))
    return rows


def bench_demo_engines(model: str, steps: int = 4) -> list[dict]:
    """Seconds per whole demo step (its own objective) with each rollout engine: what picks the engine
    of the demo and the SmolLM2 studies on this machine (engine start-up is not counted; it is paid
    once per run)."""
    rows, total = [], {}
    engines = ["hf"] + (["vllm"] if vllm_available() else [])
    for engine in engines:
        mean, args = _demo_steps(model, steps, "--engine", engine)
        total[engine] = mean("step_time")
        n = f"batch {args.per_device_train_batch_size} x {args.max_completion_length} tokens, mean of {steps - 1} steps"
        rows += [dict(what=f"demo step [{engine}]: total", value=total[engine], unit="s", detail=n),
                 dict(what=f"demo step [{engine}]: rollout (push included)", value=mean("time/rollout"), unit="s",
                      detail="")]
        gc.collect()
    if len(total) == 2:
        rows.append(dict(what="demo step time, vllm / hf", value=total["vllm"] / total["hf"], unit="x",
                         detail=f"{DEMO_CONFIG} uses engine: {_demo_engine()}"))
    return rows


def bench_opd(model: str, steps: int = 4) -> list[dict]:
    """Seconds per on-policy distillation step (objective opd) with the HF engine (generates with the
    live LoRA on), with vLLM pushing baked + live weights (the decoder layers the LoRA touches) before
    every rollout, and with vLLM serving the live LoRA as an adapter (vllm_lora_sync)."""
    rows, push, roll = [], {}, {}
    runs = [("hf", ())] + ([("vllm", ()), ("vllm, LoRA sync", ("--vllm_lora_sync", "true"))]
                           if vllm_available() else [])
    for label, extra in runs:
        engine = label.split(",")[0]
        mean, args = _demo_steps(model, steps, "--objective", "opd", "--engine", engine, *extra)
        n = f"batch {args.per_device_train_batch_size} x {args.max_completion_length} tokens, mean of {steps - 1} steps"
        push[label], roll[label] = mean("time/push"), mean("time/rollout")
        what = "live LoRA as a vLLM adapter (saved; vLLM loads it inside the rollout)" if extra else \
            "baked + live weights"
        rows += [dict(what=f"OPD step [{label}]: total", value=mean("step_time"), unit="s", detail=n),
                 dict(what=f"OPD step [{label}]: rollout from the learner (push included)", value=mean("time/rollout"),
                      unit="s", detail=""),
                 dict(what=f"OPD step [{label}]: push of {what}", value=push[label], unit="s",
                      detail="vLLM only: the engine holds its own weights"),
                 dict(what=f"OPD step [{label}]: teacher forward", value=mean("time/teacher"), unit="s", detail="")]
        gc.collect()
    if "vllm, LoRA sync" in push:  # the adapter's load and its LoRA kernels are paid inside the rollout
        rows += [dict(what="OPD push per step, LoRA sync / whole-layer push", unit="x",
                      value=push["vllm, LoRA sync"] / max(push["vllm"], 1e-9),
                      detail="same run; the layer push grows with the model, the adapter with r"),
                 dict(what="OPD rollout incl. push, LoRA sync / whole-layer push", unit="x",
                      value=roll["vllm, LoRA sync"] / max(roll["vllm"], 1e-9),
                      detail="same run; what the step pays (adapter load + LoRA kernels in generation)")]
    return rows


def bench_scoring(lm, preset, n: int = 8, group: int = 4, new_tokens: int = 48, repeats: int = 5) -> list[dict]:
    """Reward scoring of one GRPO batch (all components; the demo's shape: n rollouts, `group` per
    prompt) with the shared-work cache vs the plain pass, interleaved so a slow spell of the machine
    hits both. The cached scorer keeps its prefix KV across batches (as between two bakes); its first
    batch, which builds that KV (as the first after a bake), is its own row."""
    users = [u for u in preset.prompts[:n // group] for _ in range(group)]
    ro = HFEngine(lm.model, lm.tokenizer).generate([render_prompt(lm.tokenizer, u) for u in users], None,
                                                    Sampling(max_new_tokens=new_tokens, temperature=1.0, seed=0),
                                                    logprobs=False)
    ids, texts = [r.completion_ids for r in ro], [r.text for r in ro]
    scorers = {cache: preset_scorer(lm.model, lm.tokenizer, preset, RewardConfig(), cache_prefix=cache)
               for cache in (True, False)}
    t: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats + 1):
        for cache, sc in scorers.items():
            sc._memo = None
            t0 = time.perf_counter()
            sc.components(users, ids, texts)
            t[cache].append(time.perf_counter() - t0)
    cold, warm, plain = t[True][0], min(t[True][1:]), min(t[False][1:])
    shape = f"{n} completions ({n // group} prompts x {group}) x {new_tokens} tokens, best of {repeats}"
    return [dict(what="scoring: one GRPO batch, cached (prefix KV kept between bakes)", value=warm, unit="s",
                 detail=shape),
            dict(what="scoring: first batch after a bake (prefix KV built)", value=cold, unit="s", detail="one run"),
            dict(what="scoring: one GRPO batch, uncached", value=plain, unit="s", detail=shape),
            dict(what="scoring time, cached / uncached", value=warm / plain, unit="x", detail="target <= 0.5x")]


def bench_study_arm(model: str, study: str = "recipes/compare/smollm2_cpu.yaml", arm: str = "online_nll") -> list[dict]:
    """Seconds per study arm: one seed of one online arm of the SmolLM2 study at its budget (its own
    process, as `steer-heal compare` runs it) plus the study's final evaluation of it, in a scratch
    compare dir (the evaluator's model load, vector and dose are shared by a study's arms, so not timed)."""
    d = tempfile.mkdtemp(prefix="bench_arm_")
    cfg = load_compare(study, [f"compare_dir={d}", "seeds=[42]", f"model={model}"])
    a = next(x for x in cfg.arms if x.name == arm)
    t0 = time.perf_counter()
    info = train_arm(cfg, a, 42)
    t_train = time.perf_counter() - t0
    ev = Evaluator(cfg)  # model load, vector, dose: shared by every arm of a study, so not counted
    t0 = time.perf_counter()
    ev.evaluate(a, final_adapter(arm_dir(cfg, a, 42)))
    t_eval = time.perf_counter() - t0
    return [dict(what=f"seconds per study arm ({arm}, 1 seed): training + final evaluation", value=t_train + t_eval,
                 unit="s", detail=f"{study}: training {t_train:.0f} s ({info['gen_tokens']} generated tokens), "
                                  f"evaluation {t_eval:.0f} s (32 prompts + 132 x 2 vignettes)")]


def print_table(rows: list[dict], header: str) -> str:
    w = max(len(r["what"]) for r in rows)
    lines = [header, f"{'measurement'.ljust(w)}  {'value':>10}  unit           detail", "-" * (w + 50)]
    lines += [f"{r['what'].ljust(w)}  {r['value']:>10.2f}  {r['unit']:<13}  {r['detail']}" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--mem-child":
        print(json.dumps(_mem_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--heal-examples", type=int, default=32)
    ap.add_argument("--heal-batch", type=int, default=HealConfig().batch_size)
    ap.add_argument("--mfv-think", type=int, default=32)
    ap.add_argument("--mfv-batch", type=int, default=32)
    ap.add_argument("--mfv-subset", type=int, default=44, help="vignettes both evaluators are timed on")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="sections to skip: gen vllm heal memory mfv (mfv_full: only its full-set timing) scoring "
                         "grpo engine opd arm")
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(a.model, dtype="float32")
    preset = load_preset("care-over-authority")
    layers = layer_band(lm.model.config.num_hidden_layers)
    v = extract_vector(lm.model, lm.tokenizer, preset.persona_pos, preset.persona_neg, preset.contexts[:32], layers)
    rows = []
    head = f"steer-heal bench  model={a.model}  torch threads={torch.get_num_threads()}  cpu={os.cpu_count()}"
    if "gen" not in a.skip:
        rows += bench_generation(lm, preset, a.prompts, a.new_tokens, a.gen_batch, v)
        print_table(rows, head)
    if "vllm" not in a.skip:
        rows += bench_vllm(lm, preset, a.prompts, a.new_tokens, v)
        print_table(rows, head)
    if "heal" not in a.skip:
        rows += bench_heal(lm, preset, a.heal_examples, a.heal_batch)
        print_table(rows, head)
    if "mfv" not in a.skip:
        rows += bench_mfv(lm, a.mfv_think, a.mfv_batch, a.mfv_subset, full_set="mfv_full" not in a.skip)
        print_table(rows, head)
    if "scoring" not in a.skip:
        rows += bench_scoring(lm, preset)
        print_table(rows, head)
    if "grpo" not in a.skip:
        rows += bench_grpo(a.model)
        print_table(rows, head)
    if "engine" not in a.skip:
        rows += bench_demo_engines(a.model)
        print_table(rows, head)
    if "opd" not in a.skip:
        rows += bench_opd(a.model)
        print_table(rows, head)
    if "arm" not in a.skip:
        rows += bench_study_arm(a.model)
        print_table(rows, head)
    if "memory" not in a.skip:
        rows += bench_memory(a.model, "SmolLM2 (49k vocab)", 8, 96)
        rows += bench_memory("tiny-random/gemma3-262k", "gemma-3 vocab (262k), tiny body", 8, 96)
    text = print_table(rows, "\n" + head)
    Path("bench_out").mkdir(exist_ok=True)
    Path("bench_out/bench.md").write_text("```\n" + text + "\n```\n")


if __name__ == "__main__":
    main()
