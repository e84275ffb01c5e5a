"""The iterative loop end to end on the tiny model: run directory, resume equivalence."""
import json
from pathlib import Path

from steer_heal.cli import main

VOLATILE = {"seconds", "heal_tokens_per_s"}


def _rows(d):
    return [json.loads(x) for x in open(Path(d) / "rounds.jsonl")]


def _same(a, b):
    drop = lambda r: {k: (_same_rec(v) if k == "record" else v) for k, v in r.items() if k not in VOLATILE}  # noqa: E731
    return drop(a) == drop(b)


def _same_rec(rec):
    return {k: v for k, v in rec.items() if k not in VOLATILE}


def test_run_dir_complete(tiny_cfg):
    d = Path(tiny_cfg.run_dir)
    assert main(["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
                 f"run_dir={d}"]) == 0
    rows = _rows(d)
    assert [r["round"] for r in rows] == [0, 1]
    for f in ("config.yaml", "events.jsonl", "round_table.md", "trajectory.png", "trajectory.html", "outputs.html",
              "base_eval.json"):
        assert (d / f).exists(), f
    for r in (0, 1):
        rd = d / f"round_{r:02d}"
        for f in ("vector.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                  "cumulative/adapter_model.safetensors", "samples.jsonl", "eval.json"):
            assert (rd / f).exists(), (r, f)
    # cos_r0 re-measured in float64 from the saved vectors (round 1's vector is the healed student's)
    from safetensors.numpy import load_file

    v0, v1 = (load_file(str(d / f"round_{r:02d}" / "vector.safetensors"))["vectors"].astype("float64").ravel()
              for r in (0, 1))
    cos = float(v0 @ v1 / ((v0 @ v0) ** 0.5 * (v1 @ v1) ** 0.5))
    assert abs(rows[0]["cos_r0"] - 1.0) < 1e-12 and abs(rows[1]["cos_r0"] - cos) < 1e-5 and cos < 1 - 1e-6
    assert rows[0]["kept"] <= rows[0]["generated"]
    # the shared record: the healed student's scores as eval.json saved them, the doses it generated at, its adapter
    from steer_heal.rundir import Record, read_records

    cfg = __import__("yaml").safe_load((d / "config.yaml").read_text())
    for r, rec in zip(rows, read_records(d)):
        healed = json.loads((d / f"round_{r['round']:02d}" / "eval.json").read_text())["healed"]
        assert rec == Record(**r["record"]) and rec.index == r["round"]
        assert (rec.trait, rec.coherence, rec.incoherence) == (healed["trait"], healed["coherence"],
                                                                healed["incoherence"])
        assert rec.doses == [round(a * r["kappa"], 6) for a in cfg["steer"]["alphas"]]
        assert (d / rec.adapter / "adapter_model.safetensors").exists() and rec.adapter.startswith("round_")
        assert rec.trained_tokens == r["trained_tokens"] > 0 and rec.gen_tokens == r["gen_tokens"]
    # the student carries the vector: round 1's shift from base against round 0's vector, recomputed with PEFT's
    # own loader of the cumulative adapter and a plain base model, one prompt at a time in float64
    import torch
    from peft import PeftModel

    from steer_heal.chat import render_prompt
    from steer_heal.models import load_model
    from steer_heal.presets import load_preset

    v = torch.from_numpy(load_file(str(d / "round_00" / "vector.safetensors"))["vectors"]).double()
    layers = json.loads(__import__("safetensors").safe_open(str(d / "round_00" / "vector.safetensors"),
                                                             "pt").metadata()["layers"])
    base = load_model(tiny_cfg.model.model, dtype="float32", device="cpu")
    tuned = PeftModel.from_pretrained(load_model(tiny_cfg.model.model, dtype="float32", device="cpu").model,
                                      str(d / "round_01" / "cumulative"))
    users = load_preset("care-over-authority").split("dev")
    shift = torch.zeros_like(v)

    def last_states(model, ids):  # decoder-layer outputs at the last token (hidden_states[-1] is after the norm)
        from steer_heal.models import decoder_layers

        got = {}
        hooks = [decoder_layers(model)[layer].register_forward_hook(
            lambda m, a, o, k=k: got.__setitem__(k, (o[0] if isinstance(o, tuple) else o)[0, -1].double()))
            for k, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()
        return got

    for u in users:
        ids = base.tokenizer(render_prompt(base.tokenizer, u), return_tensors="pt", add_special_tokens=False).input_ids
        hb, ht = last_states(base.model, ids), last_states(tuned, ids)
        for k in range(len(layers)):
            shift[k] += (ht[k] - hb[k]) / len(users)
    s_, v_ = shift.flatten(), v.flatten()
    assert abs(rows[1]["shift_cos"] - float(s_ @ v_ / (s_.norm() * v_.norm()))) < 1e-4
    assert abs(rows[1]["shift_dose"] - float(s_ @ v_ / (v_ @ v_))) < 1e-4 + 1e-3 * abs(rows[1]["shift_dose"])
    assert "r1 healed" in (d / "outputs.html").read_text()
    events = [json.loads(x)["event"] for x in open(d / "events.jsonl")]
    assert {"walk_c", "dose_table", "heal_step", "borderline"} <= set(events)


def test_resume_gives_same_round_1_row(tiny_cfg, tmp_path):
    base = ["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(base + [f"run_dir={full}", "rounds=2"]) == 0
    assert main(base + [f"run_dir={part}", "rounds=1"]) == 0  # stopped after round 0
    assert [r["round"] for r in _rows(part)] == [0]
    assert main(["run", "--resume", str(part), "rounds=2"]) == 0
    a, b = _rows(full), _rows(part)
    assert [r["round"] for r in b] == [0, 1]
    assert _same(a[0], b[0]) and _same(a[1], b[1]), (a[1], b[1])


def test_export_cli(tiny_cfg, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from steer_heal.models import load_model
    from steer_heal.student import Student

    d = Path(tiny_cfg.run_dir)
    assert main(["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
                 f"run_dir={d}", "rounds=1"]) == 0
    assert main(["export", str(d), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    lm = load_model(tiny_cfg.model.model, dtype="float32")
    st = Student(lm.model, lm.tokenizer, 4, 8, (0.0, 1.0))
    st.load_cumulative(d / "round_00" / "cumulative")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, st.model(input_ids=ids).logits, atol=1e-4)
