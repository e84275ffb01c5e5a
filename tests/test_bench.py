"""`make bench`'s own correctness (its timings are never asserted): each section measures the base
model, and the MFV speed-up divides only by a tinymfv time taken on this machine."""
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "recipes/bench.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_heal_section_leaves_the_base_model_for_the_next_sections(tiny):
    from steer_heal.presets import load_preset

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    before = tiny.model(ids).logits.detach().clone()
    names = {n for n, _ in tiny.model.named_modules()}
    rows = _bench().bench_heal(tiny, load_preset("care-over-authority"), n_examples=4, batch=2)
    assert rows[0]["value"] > 0  # it trained (tokens went through the heal)
    assert {n for n, _ in tiny.model.named_modules()} == names  # no LoRA layer left behind
    assert torch.equal(tiny.model(ids).logits, before)


def test_tinymfv_time_is_per_machine(tmp_path, monkeypatch):
    from steer_heal import machine

    f = tmp_path / "t.json"
    rec = dict(seconds=636.0, n=132, think_tokens=32, date="2026-12-01", origin="x --time")
    machine.store_timing("tinymfv_classic", rec, f)
    assert machine.load_timing("tinymfv_classic", f) == rec
    assert json.loads(f.read_text())[machine.machine_key()]["tinymfv_classic"]["seconds"] == 636.0
    monkeypatch.setattr(machine, "machine_key", lambda: "another cpu x64")
    assert machine.load_timing("tinymfv_classic", f) is None  # another machine's time is not ours
