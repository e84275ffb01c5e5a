import torch

from steer_heal.chat import render_prompt
from steer_heal.student import Student, export_merged


def _ids(tok):
    return tok([render_prompt(tok, "hello there"), render_prompt(tok, "tell me a story please")],
               return_tensors="pt", padding=True)


def _randomise_live(st, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in st.layers.values():
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)


def _logits(model, ids):
    with torch.no_grad():
        return model(**ids).logits


def make_student(tiny):
    return Student(tiny.model, tiny.tokenizer, r=4, alpha=8, band=(0.0, 1.0), base_path=tiny.path)


def test_base_exact_after_two_bakes(tiny):
    ids = _ids(tiny.tokenizer)
    orig = _logits(tiny.model, ids)
    st = make_student(tiny)
    for k in range(2):
        _randomise_live(st, k)
        st.bake()
    baked = _logits(st.model, ids)
    assert not torch.allclose(baked, orig, atol=1e-3)  # the bakes changed the student
    with st.base():
        assert torch.equal(_logits(st.model, ids), orig)
    assert torch.equal(_logits(st.model, ids), baked)  # leaving base() restores the baked student


def test_fresh_live_adapter_is_noop_and_live_off_is_prev(tiny):
    ids = _ids(tiny.tokenizer)
    st = make_student(tiny)
    _randomise_live(st, 0)
    st.bake()
    baked = _logits(st.model, ids)  # live adapter freshly reset: B = 0
    assert torch.equal(baked, _logits(st.model, ids))
    _randomise_live(st, 1)
    assert not torch.allclose(_logits(st.model, ids), baked, atol=1e-3)
    with st.live_off():
        assert torch.equal(_logits(st.model, ids), baked)


def test_cumulative_adapter_loads_with_peft_and_reproduces(tiny, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = _ids(tiny.tokenizer)
    st = make_student(tiny)
    _randomise_live(st, 0)
    st.save_live(tmp_path / "r0_adapter")
    st.bake()
    _randomise_live(st, 1)
    st.bake()
    st.save_cumulative(tmp_path / "cum")
    baked = _logits(st.model, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "cum"))
    # fp32 noise: the folded history vs PEFT's unmerged adapter differ by up to 1.5e-5 depending on the thread
    # layout a preceding test left (9e-6 alone); a wrong adapter is >= 1e-3 away (checked below)
    assert torch.allclose(_logits(loaded, ids), baked, atol=1e-4)
    # the round-0 adapter alone, on the original model, is the round-0 student
    base0 = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    r0 = PeftModel.from_pretrained(base0, str(tmp_path / "r0_adapter"))
    assert not torch.allclose(_logits(r0, ids), baked, atol=1e-3)


def test_export_merged_matches(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = _ids(tiny.tokenizer)
    st = make_student(tiny)
    _randomise_live(st, 3)
    st.bake()
    st.save_cumulative(tmp_path / "cum")
    out = export_merged(tiny.path, tmp_path / "cum", tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert "lora" not in " ".join(n for n, _ in plain.named_parameters())
    assert torch.allclose(_logits(plain, ids), _logits(st.model, ids), atol=1e-4)


def test_load_cumulative_is_bit_identical(tiny, tiny_dir, tmp_path):
    from steer_heal.models import load_model

    ids = _ids(tiny.tokenizer)
    st = make_student(tiny)
    _randomise_live(st, 5)
    st.bake()
    st.save_cumulative(tmp_path / "cum")
    fresh = make_student(load_model(tiny.path, dtype="float32"))
    fresh.load_cumulative(tmp_path / "cum")
    assert fresh.n_bakes == 1
    assert torch.equal(_logits(fresh.model, ids), _logits(st.model, ids))
