from steer_heal.chat import render_prompt
from steer_heal.engine.base import Rollout, RolloutEngine, Sampling
from steer_heal.engine.hf import HFEngine
from steer_heal.engine.vllm_engine import VLLMConfig, VLLMEngine


def make_engine(kind: str, student, tok, layers: list[int], batch_size: int = 32, vllm: VLLMConfig | None = None,
                seed: int = 0, progress: bool = False):
    """The rollout engine both loops use (`engine: hf | vllm`). The HF engine serves the student's own
    modules; the vLLM engine loads the original checkpoint and gets the baked layers pushed."""
    if kind == "hf":
        return HFEngine(student.model, tok, batch_size=batch_size, progress=progress)
    if kind == "vllm":
        dtype = next(student.model.parameters()).dtype
        eng = VLLMEngine(student.base_path, tok, layers, vllm, dtype=dtype, seed=seed,
                         lora_rank=student.lora_config.r)
        if student.n_bakes:
            eng.push(student)
        return eng
    raise ValueError(f"unknown engine '{kind}'; fix: engine: hf or engine: vllm")


def check_push(engine, student, users: list[str], max_new_tokens: int = 8) -> dict:
    """After a push: how many greedy completions of the engine equal the HF baked student's (an
    engine serving the student's own modules matches trivially). GPU kernels may differ by a token
    now and then; a push that failed shows as ~0, and is printed as a warning."""
    if isinstance(engine, HFEngine):
        return dict(engine="hf", n=len(users), greedy_match=len(users))
    prompts = [render_prompt(student.tok, u) for u in users]
    g = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    with student.live_off():
        ref = HFEngine(student.model, student.tok).generate(prompts, None, g, logprobs=False)
    got = engine.generate(prompts, None, g, logprobs=False)
    match = sum(a.completion_ids == b.completion_ids for a, b in zip(ref, got))
    if match < len(users) // 2:
        print(f"warning: after the weight push only {match}/{len(users)} greedy completions of the engine match "
              "the HF baked student", flush=True)
    return dict(engine="vllm", n=len(users), greedy_match=match)


__all__ = ["check_push", "Rollout", "RolloutEngine", "Sampling", "HFEngine", "VLLMConfig", "VLLMEngine", "make_engine"]
