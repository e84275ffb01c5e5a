"""sdpa_gqa (steer_heal/attention.py) against transformers' own sdpa (KV heads copied) in float64: logits on a
left-padded batch, greedy decoding through the KV cache, and gradients; and it skips the KV-head copy."""
import copy
import json

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_mod

from steer_heal import attention
from steer_heal.engine.base import Sampling
from steer_heal.engine.hf import HFEngine
from steer_heal.logprobs import left_pad


def _pair(lm):
    """(the loaded model, a copy on transformers' own sdpa), both float64."""
    fast = lm.model.to(torch.float64)
    ref = copy.deepcopy(fast)
    ref.set_attn_implementation("sdpa")
    return fast, ref


def _batch(tok):
    rows = [tok.encode(t) for t in ("a long first row of several words here", "short", "mid length row")]
    return left_pad(rows, tok.pad_token_id)


def test_load_model_picks_sdpa_gqa(tiny_any):
    assert tiny_any.model.config._attn_implementation == attention.NAME


def test_logits_and_gradients_match_stock_sdpa_float64(tiny_any):
    fast, ref = _pair(tiny_any)
    ids, att = _batch(tiny_any.tokenizer)
    out = []
    for m in (fast, ref):
        m.train()
        m.zero_grad()
        logits = m(input_ids=ids, attention_mask=att).logits
        (logits[att.bool()].logsumexp(-1).sum()).backward()
        out.append((logits.detach()[att.bool()], {n: p.grad.clone() for n, p in m.named_parameters()}))
    (lf, gf), (lr, gr) = out
    assert torch.allclose(lf, lr, atol=1e-10, rtol=0)
    for n in gr:
        assert torch.allclose(gf[n], gr[n], atol=1e-9, rtol=1e-7), n


def test_cached_decoding_matches_stock_sdpa(tiny_any):
    fast, ref = _pair(tiny_any)
    tok = tiny_any.tokenizer
    rows = [tok.encode(t) for t in ("a long first row of several words here", "short", "mid length row")]
    samp = Sampling(max_new_tokens=8, min_new_tokens=8, temperature=0.0)
    a, _ = HFEngine(fast, tok, batch_size=3).generate_batch(rows, None, samp)
    b, _ = HFEngine(ref, tok, batch_size=3).generate_batch(rows, None, samp)
    assert a == b


def test_masked_grouped_calls_do_not_copy_kv_heads(tiny, monkeypatch):
    """The point of it: stock sdpa copies the grouped KV heads under a mask, sdpa_gqa does not."""
    calls = []
    real = sdpa_mod.repeat_kv
    monkeypatch.setattr(sdpa_mod, "repeat_kv", lambda x, n: calls.append(n) or real(x, n))
    ids, att = _batch(tiny.tokenizer)
    with torch.no_grad():
        tiny.model(input_ids=ids, attention_mask=att)
        assert calls == []
        tiny.model.set_attn_implementation("sdpa")
        tiny.model(input_ids=ids, attention_mask=att)
    assert calls and set(calls) == {tiny.model.config.num_attention_heads // tiny.model.config.num_key_value_heads}


@pytest.mark.parametrize("device", ["meta"])
def test_other_devices_use_transformers_own_sdpa(tiny, monkeypatch, device):
    seen = []
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda *a, **k: seen.append(a[1].device.type) or (None, None))
    mod = type("M", (), {"num_key_value_groups": 2, "is_causal": True})()
    q = torch.empty(1, 2, 3, 8, device=device)
    kv = torch.empty(1, 1, 3, 8, device=device)
    attention.sdpa_gqa_forward(mod, q, kv, kv, None)
    assert seen == [device]


def test_saved_config_names_plain_sdpa_or_nothing(tiny, tmp_path):
    """A model saved by the project (a merged export) must load where steer_heal is not imported."""
    tiny.model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert attention.NAME not in json.dumps(cfg)


@pytest.mark.parametrize("q_len", [1, 5])
def test_head_grouping_matches_repeated_heads(q_len):
    """6 query heads on 2 KV heads (the tiny models have one KV head, where any grouping order agrees)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, q_len, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, 1, q_len, 7, dtype=torch.bool).tril(7 - q_len)
    mask[1, :, :, :2] = False  # a left-padded row (every query keeps a key)
    mod = type("M", (), {"num_key_value_groups": 3, "is_causal": True})()
    a, _ = attention.sdpa_gqa_forward(mod, q, k, v, mask, scaling=0.3)
    b, _ = sdpa_mod.sdpa_attention_forward(mod, q, k, v, mask, scaling=0.3)
    naive = torch.softmax((q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.3).masked_fill(~mask, -torch.inf), -1)
    naive = (naive @ v.repeat_interleave(3, 1)).transpose(1, 2)
    assert torch.allclose(a, b, atol=1e-12) and torch.allclose(a, naive, atol=1e-12)
