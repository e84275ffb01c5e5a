import json
import math
from pathlib import Path

import pytest
import torch

from steer_heal.evals import protocol as P
from steer_heal.evals.mfv import (
    DigitTokenError,
    _answer_full,
    answer_suffix,
    digit_token_ids,
    evaluate_mfv,
    informedness,
    row_math,
    surgicality,
    think_prompt,
    trait_nats,
)
from steer_heal.evals.mfv_data import MFVDataError, load_vignettes, stratified


def test_protocol_strings_match_shared_protocol_json(mfv_dir):
    pj = json.loads((Path(mfv_dir) / "protocol.json").read_text())
    assert pj["foundations"] == P.FOUNDATIONS and pj["option_text"] == P.OPTION_TEXT
    for k, v in [("schema_header", P.SCHEMA_HEADER), ("schema_template", P.SCHEMA_TEMPLATE),
                 ("option_line_template", P.OPTION_LINE), ("user_template", P.USER_TEMPLATE),
                 ("open_think", P.OPEN_THINK), ("close_think", P.CLOSE_THINK), ("nudge", P.NUDGE),
                 ("prefill", P.PREFILL)]:
        assert pj[k] == v, k


def test_row_math_hand_example():
    lf = [math.log(x) for x in (0.4, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05)]  # forward: digit k = foundation k
    lr = [math.log(x) for x in (0.02, 0.02, 0.02, 0.02, 0.02, 0.2, 0.5)]  # reversed: digit k = foundation 6-k
    m = row_math(lf, lr)
    # Care: fwd digit 0 (0.4), rev digit 6 (0.5); Fairness: fwd 1 (0.1), rev 5 (0.2); others 0.1/0.05 with 0.02
    sc = [(math.log(0.4) + math.log(0.5)) / 2, (math.log(0.1) + math.log(0.2)) / 2,
          (math.log(0.1) + math.log(0.02)) / 2] + [(math.log(0.05) + math.log(0.02)) / 2] * 4
    assert m["score"] == pytest.approx(sc)
    z = sum(math.exp(s) for s in sc)
    assert m["p"] == pytest.approx([math.exp(s) / z for s in sc])
    assert m["pmass_allowed"] == pytest.approx((0.8 + 0.8) / 2)  # 0.4+0.1+0.1+4*0.05 ; 5*0.02+0.2+0.5
    assert m["top1"] == 0 and m["margin"] == pytest.approx(sc[0] - sc[1])  # nats, as tinymfv
    bad = row_math(lf[:6] + [float("nan")], lr)  # a frame that could not be read: the row is unscorable
    assert bad["top1"] == -1 and math.isnan(bad["pmass_allowed"]) and all(math.isnan(x) for x in bad["p"])


def test_reversed_frame_maps_back():
    lf = [-5.0] * 7
    lr = [-5.0] * 7
    lf[2] = -0.1  # forward: digit 2 is Loyalty
    lr[6 - 2] = -0.1  # reversed: digit 4 is Loyalty too
    assert P.FOUNDATIONS[row_math(lf, lr)["top1"]] == "Loyalty"
    rev = P.user_turn("v", 1)
    assert '"0", # ' + P.OPTION_TEXT["SocialNorms"] in rev and '"6", # ' + P.OPTION_TEXT["Care"] in rev
    fwd = P.user_turn("v", 0)
    assert '"0", # ' + P.OPTION_TEXT["Care"] in fwd and '"3", # ' + P.OPTION_TEXT["Authority"] in fwd


def test_multi_token_digits_error():
    class SplitDigits:
        def encode(self, s, add_special_tokens=False):
            return [7, 8] if s.isdigit() else [1]

    with pytest.raises(DigitTokenError, match="single-token digits"):
        digit_token_ids(SplitDigits())


def test_stratified_subset_keeps_every_foundation(mfv_dir):
    rows = load_vignettes(mfv_dir)
    assert len(rows) == 132
    sub = stratified(rows, 14, seed=0)
    assert len(sub) == 14 and {r["foundation_coarse"] for r in sub} == set(P.FOUNDATIONS)
    assert [r["id"] for r in sub] != [r["id"] for r in rows[:14]]
    assert stratified(rows, 14, seed=0) == sub


def test_missing_data_error_names_both_ways(monkeypatch, tmp_path):
    monkeypatch.delenv("STEER_HEAL_MFV_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(MFVDataError) as e:
        load_vignettes(None)
    assert "STEER_HEAL_MFV_DIR" in str(e.value) and "wassname/tiny-mfv" in str(e.value)
    with pytest.raises(MFVDataError, match="STEER_HEAL_MFV_DIR"):
        load_vignettes(str(tmp_path))


def test_batch_composition_does_not_change_a_row(tiny, mfv_dir):
    rows = load_vignettes(mfv_dir)
    lens = sorted(rows, key=lambda r: len(r["text"]))
    mixed = [lens[0], lens[-1], lens[40], lens[90], lens[10], lens[120], lens[60], lens[5]]  # mixed lengths
    alone = evaluate_mfv(tiny.model, tiny.tokenizer, mixed[:1], think_tokens=6, batch_size=1, progress=False)
    batch = evaluate_mfv(tiny.model, tiny.tokenizer, mixed, think_tokens=6, batch_size=16, progress=False)
    assert batch.rows[0]["think_fwd"] == alone.rows[0]["think_fwd"]
    d = max(abs(a - b) for a, b in zip(alone.rows[0]["score"], batch.rows[0]["score"]))
    assert d < 1e-4, d
    assert abs(alone.rows[0]["nll_prefill"] - batch.rows[0]["nll_prefill"]) < 1e-4


@pytest.mark.parametrize("read", ["exact", "tinymfv"])
def test_cached_answer_equals_full_forward(tiny, mfv_dir, read):
    """The KV-cache continuation gives the same digits as re-running the whole sequence: every think
    token and every real token (exact), or tinymfv's context (last think token dropped, pad-id
    tokens before the answer turn not attended)."""
    tok = tiny.tokenizer
    rows = load_vignettes(mfv_dir)[:3]
    res = evaluate_mfv(tiny.model, tok, rows, think_tokens=5, batch_size=4, progress=False, read=read)
    digits = digit_token_ids(tok)
    suffix = tok.encode(answer_suffix(tok), add_special_tokens=False)
    prefill = tok.encode(P.PREFILL, add_special_tokens=False)
    for r, out in zip(rows, res.rows):
        p = tok.encode(think_prompt(tok, r["text"], 0), add_special_tokens=False)
        assert tok.pad_token_id in p  # the template's turn-end token is the pad id: tinymfv's mask differs
        think = out["think_ids_fwd"] if read == "exact" else out["think_ids_fwd"][:-1]
        d, n = _answer_full(tiny.model, tok, [p + think + suffix + prefill], len(prefill), digits,
                            len(suffix) + len(prefill), read)
        assert torch.allclose(d[0], torch.tensor(out["logp_fwd"]), atol=1e-4)
    other = evaluate_mfv(tiny.model, tok, rows, think_tokens=5, batch_size=4, progress=False,
                         read="tinymfv" if read == "exact" else "exact")
    assert max(abs(a - b) for a, b in zip(other.rows[0]["logp_fwd"], res.rows[0]["logp_fwd"])) > 1e-4


def test_think_prompt_and_suffix_from_template(tiny):
    tok = tiny.tokenizer
    tp = think_prompt(tok, "A vignette.", 0)
    assert tp.startswith("<|im_start|>user\nA vignette.\n\n" + P.SCHEMA_HEADER) and tp.endswith("assistant\n<think>\n")
    assert answer_suffix(tok) == "</think><|im_end|>\n<|im_start|>user\nJust answer<|im_end|>\n<|im_start|>assistant\n"


def test_trait_and_surgicality_and_informedness():
    from steer_heal.evals.mfv import MFVResult

    def mk(profile):
        return MFVResult([], profile, [1 / 7] * 7, 1.0, 0.0, 1.0, 0.0, 0.0, 0)

    base = mk([0.1, 0.1, 0.1, 0.3, 0.1, 0.1, 0.2])
    moved = mk([0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2])  # Care up, Authority down, rest still
    axis = {"Care": 1, "Authority": -1}
    # Care +log 3, Authority -(-log 3): mean of the two signed shifts
    assert trait_nats(moved, axis) - trait_nats(base, axis) == pytest.approx(math.log(3))
    s = surgicality(moved, base, axis)
    assert s["surgical"] and s["offtarget_max"] == pytest.approx(0.0)
    assert informedness([0, 1, 2, 0], [0, 1, 2, 0]) == pytest.approx(1.0)
    assert informedness([0, 0, 0, 0], [0, 1, 2, 0]) == pytest.approx(0.0)


def test_eval_cli_on_a_run(tiny_cfg, tmp_path, capsys):
    from steer_heal.cli import main

    d = tmp_path / "run"
    assert main(["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
                 f"run_dir={d}", "rounds=1"]) == 0
    row = json.loads((d / "rounds.jsonl").read_text().splitlines()[0])
    assert {"trait_nats_healed", "pmass_healed", "nll_prefill_steered", "d_trait_nats_healed"} <= set(row)
    assert (d / "mfv_profile.png").exists() and (d / "round_00" / "mfv_healed.json").exists()
    capsys.readouterr()
    out = tmp_path / "e.json"
    assert main(["eval", "--run", str(d), "--round", "0", "--n", "7", "--think", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Authority" in printed and "human p" in printed and "pmass_allowed" in printed
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 7 and res["adapter"].endswith("cumulative")
    # the CLI on the run's baked student reproduces the loop's own healed evaluation (same rows, same T)
    loop = json.loads((d / "round_00" / "mfv_healed.json").read_text())
    assert res["summary"]["profile"] == pytest.approx(loop["summary"]["profile"], abs=1e-4)
