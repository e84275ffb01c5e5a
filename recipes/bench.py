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
import ctypes
import gc
import json
import os
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
from steer_heal.compare import Evaluator, arm_dir, final_adapter, load_compare, train_arm  # noqa: E402
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
from steer_heal.machine import load_timing, machine_key  # noqa: E402
from steer_heal.models import DEFAULT_MODEL, load_model  # noqa: E402
from steer_heal.presets import load_preset  # noqa: E402
from steer_heal.steering import Steering, extract_vector, layer_band  # noqa: E402
from steer_heal.student import Student  # noqa: E402


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
    return rows


def bench_generation(lm, preset, n_prompts: int, new_tokens: int, batch: int, v) -> list[dict]:
    prompts = [render_prompt(lm.tokenizer, u) for u in (preset.prompts * 4)[:n_prompts]]
    rows = _hf_rates(lm, prompts, Steering(v, 1.0), Sampling(max_new_tokens=new_tokens, temperature=0.0), batch,
                     "steered generation: {}")
    rows.append(
        dict(
            what="steered generation speed-up (batched / sequential)",
            value=rows[0]["value"] / rows[1]["value"],
            unit="x",
            detail="target >= 8x",
        )
    )
    return rows


def bench_vllm(lm, preset, n_prompts: int, new_tokens: int, v, repeats: int = 3) -> list[dict]:
    tok = lm.tokenizer
    prompts = [render_prompt(tok, u) for u in (preset.prompts * 4)[:n_prompts]]
    samp = Sampling(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0)
    cfg = VLLMConfig(max_model_len=1024)

    def timed(gen) -> tuple[float, str]:
        gen(prompts[:4])  # warm-up
        best = []
        for _ in range(repeats):
            t = time.perf_counter()
            n = gen(prompts)
            best.append((n / (time.perf_counter() - t), n))
        tps, n = sorted(best)[len(best) // 2]  # median of the repeats
        return tps, f"{n} tokens, median of {repeats}"

    rows = []
    # stock vLLM: the same checkpoint without steering buffers (the baseline the steering costs against)
    from vllm import LLM

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # sized like the project's engine (explicit KV cache on CPU), so it starts beside the loaded model
    llm = _build_llm(LLM, dict(model=lm.path, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                               **engine_memory(VLLMConfig(), not torch.cuda.is_available())))
    sp = sampling_params(samp, tok, [tok.eos_token_id], False)

    def stock(ps):
        outs = llm.generate(
            [{"prompt_token_ids": tok(p, add_special_tokens=False).input_ids} for p in ps], sp, use_tqdm=False
        )
        return sum(len(o.outputs[0].token_ids) for o in outs)

    tps, d = timed(stock)
    rows.append(dict(what="vLLM stock model (no steering buffers)", value=tps, unit="tok/s", detail=d))
    llm = None  # free the stock engine before building the steerable one

    gc.collect()
    eng = VLLMEngine(lm.path, tok, list(v.layers), cfg, dtype=torch.float32)
    for name, st in (("vLLM steerable engine, steering off", None), ("vLLM steered (c = 1)", Steering(v, 1.0))):
        tps, d = timed(lambda ps, st=st: sum(len(r.completion_ids) for r in eng.generate(ps, st, samp, logprobs=False)))
        rows.append(dict(what=name, value=tps, unit="tok/s", detail=d))
    eng.close()
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
        for bs in (batch, 1):
            cfg = HealConfig(epochs=1, batch_size=bs, val_frac=0.0, log_every=10 ** 9)
            st.reset_live()
            res = heal_round(st, ex, cfg, progress=False)
            rows.append(dict(what=f"heal (NLL + chunked rmse KL): batch {bs}", value=res.tokens_per_s, unit="tok/s",
                             detail=f"{res.tokens} completion tokens, {res.seconds:.1f}s, {res.steps} steps"))
    finally:
        st.model.unload()  # the LoRA layers out again: the later sections (MFV, scoring) measure the base model
    rows.append(dict(what="heal speed-up (batch / batch 1)", value=rows[0]["value"] / rows[1]["value"], unit="x",
                     detail="target >= 3x"))
    return rows


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


def bench_mfv(lm, think: int, batch: int) -> list[dict]:
    rows = load_vignettes(None, "classic", "other_violate")
    t = time.perf_counter()
    res = evaluate_mfv(lm.model, lm.tokenizer, rows, think_tokens=think, batch_size=batch, progress=False)
    dt = time.perf_counter() - t
    n_tok = 2 * len(rows) * think
    out = [dict(what=f"MFV classic ({len(rows)} x 2 frames, T={think}): wall time", value=dt, unit="s",
                detail=f"batch {batch}; pmass {res.pmass_allowed:.3f}, nll_prefill {res.nll_prefill:.3f}"),
           dict(what="MFV think tokens/s", value=n_tok / dt, unit="tok/s", detail=f"{n_tok} generated tokens")]
    ref = load_timing("tinymfv_classic")  # timed on this machine, or no ratio: another CPU's time means nothing
    if ref and ref.get("n") == len(rows) and ref.get("think_tokens") == think:
        out.append(dict(what="MFV speed-up vs tinymfv's own evaluate (batch 1)", value=ref["seconds"] / dt, unit="x",
                        detail=f"tinymfv {ref['seconds']:.0f} s on this machine ({ref['origin']}, {ref['date']}); "
                               "goal >= 4x"))
    elif len(rows) == 132:
        out.append(dict(what="MFV speed-up vs tinymfv's own evaluate (batch 1)", value=float("nan"), unit="x",
                        detail=f"no tinymfv time for this machine ({machine_key()}); fix: run "
                               "tests/fixtures/make_tinymfv_fixture.py --n 0 --time (see its docstring)"))
    return out


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
    ev.evaluate(a, final_adapter(arm_dir(cfg, a, 42), a.kind))
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
    ap.add_argument("--skip", nargs="*", default=[],
                    help="sections to skip: gen vllm heal memory mfv scoring grpo engine opd arm")
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
        rows += bench_mfv(lm, a.mfv_think, a.mfv_batch)
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
