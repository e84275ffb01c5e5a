import pytest
import torch

from steer_heal.chat import render_prompt
from steer_heal.steering import (
    LayerBandError,
    PersonaError,
    Steering,
    SteeringVector,
    check_personas,
    extract_vector,
    layer_band,
    steer,
)

POS, NEG = "You are someone kind and warm.", "You are someone cold and strict."
CTX = ["hello there", "tell me a story about a village by the river", "what is two plus two?", "help",
       "Write a short note to my neighbour about the party noise last night, please."]


def naive_vector(model, tok, layers):
    """Per-prompt, unpadded, float64 reference for the batched float32 extraction."""
    m = model.double()
    hp, hn = [], []
    with torch.no_grad():
        for x in CTX:
            for sys_, acc in ((POS, hp), (NEG, hn)):
                ids = tok(render_prompt(tok, x, system=sys_), return_tensors="pt", add_special_tokens=False).input_ids
                hs = m(input_ids=ids, output_hidden_states=True).hidden_states
                acc.append(torch.stack([hs[l + 1][0, -1] for l in layers]))
    m.float()
    return torch.stack(hp).mean(0) - torch.stack(hn).mean(0)


def test_extraction_equals_naive_float64(tiny_any):
    m, tok = tiny_any.model, tiny_any.tokenizer
    layers = [0, 1]
    v = extract_vector(m, tok, POS, NEG, CTX, layers, batch_size=3)  # left-padded mixed lengths
    ref = naive_vector(m, tok, layers[:-1])  # the last layer's hidden_states entry is post-norm
    assert v.vectors.shape == (2, m.config.hidden_size)
    assert torch.allclose(v.vectors[:1].double(), ref, atol=1e-4, rtol=1e-4), (v.vectors[:1] - ref).abs().max()
    assert v.vectors.norm() > 1e-3  # the personas do differ


def test_hooks_removed_restore_logits_bit_exactly(tiny):
    m, tok = tiny.model, tiny.tokenizer
    ids = tok([render_prompt(tok, x) for x in CTX[:2]], return_tensors="pt", padding=True)
    v = SteeringVector([0, 1], torch.randn(2, m.config.hidden_size))
    with torch.no_grad():
        before = m(**ids).logits
        with steer(m, Steering(v, 3.0)):
            during = m(**ids).logits
        after = m(**ids).logits
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    assert all(len(l._forward_hooks) == 0 for l in m.model.layers)


def test_steering_adds_c_times_v_to_layer_output(tiny):
    """The next layer's input (the residual stream after layer 0) moves by exactly c * v."""
    m, tok = tiny.model, tiny.tokenizer
    ids = tok(render_prompt(tok, "hi"), return_tensors="pt")
    v = SteeringVector([0], torch.randn(1, m.config.hidden_size))
    seen = []
    h = m.model.layers[1].register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw.get("hidden_states", args[0] if args else None).clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            m(**ids)
            with steer(m, Steering(v, 0.5)):
                m(**ids)
    finally:
        h.remove()
    plain, st = seen
    assert torch.allclose(st - plain, (0.5 * v.vectors[0]).expand_as(st), atol=1e-5)


def test_vector_save_load_roundtrip(tmp_path):
    v = SteeringVector([3, 4], torch.randn(2, 8), meta={"model_id": "m", "n_contexts": 5})
    v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(tmp_path / "v.safetensors")
    assert torch.equal(v.vectors, w.vectors) and w.layers == [3, 4] and w.meta["n_contexts"] == 5
    assert w.cosine(v) == pytest.approx(1.0)
    neg = SteeringVector([3, 4], -v.vectors)
    assert neg.cosine(v) == pytest.approx(-1.0)


def test_layer_band():
    assert layer_band(30, (0.45, 0.55)) == [13, 14, 15, 16]
    assert len(layer_band(30, (0.2, 0.8))) == 18  # middle 60%
    assert layer_band(2, (0.45, 0.55)) == [1]
    assert layer_band(10, layers=[3, 1]) == [1, 3]
    with pytest.raises(LayerBandError, match="fix"):
        layer_band(10, layers=[12])
    with pytest.raises(LayerBandError, match="fix"):
        layer_band(10, (0.6, 0.4))


def test_persona_errors():
    with pytest.raises(PersonaError, match="empty persona"):
        check_personas("", "x")
    with pytest.raises(PersonaError, match="identical"):
        check_personas("Same", "same ")


def test_iso_kl_calibration_hits_target(tiny):
    from steer_heal.dose import calibrate_coeff, steered_kl
    from steer_heal.engine import HFEngine

    m, tok = tiny.model, tiny.tokenizer
    v = extract_vector(m, tok, POS, NEG, CTX, [0])
    eng = HFEngine(m, tok)
    prompts = [render_prompt(tok, x) for x in CTX[:3]]
    c, k = calibrate_coeff(m, tok, eng, v, prompts, target=0.5, max_new_tokens=8, steps=8)
    assert abs(k - 0.5) < 0.15, (c, k)
    # re-measured another way: a token-by-token greedy steered rollout with plain forwards, full-vocabulary KL in
    # float64 per position, then the p95 (numpy's quantile over all positions)
    import numpy as np

    from steer_heal.chat import encode_prompt
    from steer_heal.steering import Steering
    from steer_heal.steering.hooks import steer

    kls = []
    for pr in prompts:
        ids = torch.tensor([encode_prompt(tok, pr)])
        n0 = ids.shape[1]
        with torch.no_grad():
            for _ in range(8):
                with steer(m, Steering(v, c)):
                    nxt = m(ids).logits[0, -1].argmax()
                if int(nxt) == tok.eos_token_id:
                    break
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if ids.shape[1] == n0:
                continue
            with steer(m, Steering(v, c)):
                ls = m(ids).logits[0, n0 - 1:-1].double().log_softmax(-1)
            lu = m(ids).logits[0, n0 - 1:-1].double().log_softmax(-1)
        kls += (ls.exp() * (ls - lu)).sum(-1).tolist()
    assert float(np.quantile(kls, 0.95)) == pytest.approx(k, rel=0.02, abs=1e-3)
    assert steered_kl(m, tok, eng, v, c * 4, prompts, 8) > k  # more dose, more divergence
