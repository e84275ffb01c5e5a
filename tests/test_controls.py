"""The comparison's controls on the tiny model: a placebo arm generates unsteered (dose 0), a
prompt-distillation arm generates under the persona prompt and trains on the plain prompt."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from steer_heal.chat import encode_prompt, render_prompt

ROOT = Path(__file__).resolve().parents[1]
USERS = ["hi", "hi", "tell me a story", "tell me a story"]


def _ctx(tiny_cfg, control: str, tmp_path, name: str):
    from steer_heal import loop

    tiny_cfg.control = control
    return loop.build(tiny_cfg, tmp_path / name)


def _trainer(step=0):
    return SimpleNamespace(state=SimpleNamespace(global_step=step),
                           accelerator=SimpleNamespace(process_index=0, device="cpu"))


def test_iterative_placebo_generates_what_the_unsteered_student_does(tiny_cfg, tmp_path):
    from steer_heal import loop, stages
    from steer_heal.steering import Steering

    steered = _ctx(tiny_cfg, "", tmp_path, "steered")
    v = stages.extract(steered.b)
    on, _ = loop.generate_scored(steered, USERS, Steering(v, 8.0), seed=5)
    off, _ = loop.generate_scored(steered, USERS, None, seed=5)
    assert [r.completion_ids for r in on] != [r.completion_ids for r in off]  # the dose matters on this model
    placebo = _ctx(tiny_cfg, "placebo", tmp_path, "placebo")
    pl, _ = loop.generate_scored(placebo, USERS, Steering(v, 8.0), seed=5)  # the loop's steering is ignored
    assert [r.completion_ids for r in pl] == [r.completion_ids for r in off]
    assert [r.prompt_ids for r in pl] == [r.prompt_ids for r in off]


def test_iterative_placebo_run_rows_have_dose_zero(tiny_cfg):
    from steer_heal.cli import main

    d = Path(tiny_cfg.run_dir)
    assert main(["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
                 f"run_dir={d}", "control=placebo", "eval.mfv=false"]) == 0
    rows = [json.loads(x) for x in open(d / "rounds.jsonl")]
    assert rows and all(r["kappa"] == 0.0 for r in rows)
    events = [json.loads(x) for x in open(d / "events.jsonl")]
    assert not any(e["event"] in ("walk_c", "calibrated") for e in events)  # no dose was searched
    dose = [e for e in events if e["event"] == "dose_table"]
    assert dose and all(x["coeff"] == 0.0 for e in dose for x in e["rows"])


def test_iterative_prompt_distil_generates_under_persona_and_trains_on_plain_prompt(tiny_cfg, tmp_path):
    from steer_heal import loop
    from steer_heal.engine import Sampling

    ctx = _ctx(tiny_cfg, "prompt_distil", tmp_path, "pd")
    tok, g = ctx.b.tok, ctx.cfg.gen
    ro, comp = loop.generate_scored(ctx, USERS, None, seed=9)
    persona = [render_prompt(tok, u, system=ctx.b.preset.persona_pos) for u in USERS]
    samp = Sampling(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, seed=9)
    with ctx.b.student.live_off():
        direct = ctx.b.engine.generate(persona, None, samp)
        plain = ctx.b.engine.generate([render_prompt(tok, u) for u in USERS], None, samp)
    assert [r.completion_ids for r in ro] == [r.completion_ids for r in direct]  # generated under the persona
    assert [r.completion_ids for r in ro] != [r.completion_ids for r in plain]
    want = [encode_prompt(tok, render_prompt(tok, u)) for u in USERS]
    assert [r.prompt_ids for r in ro] == want  # ... and the heal trains on the plain prompt's ids
    assert all(r.prompt_ids != encode_prompt(tok, p) for r, p in zip(ro, persona))


def _rollout_setup(tiny, control):
    from steer_heal.engine import HFEngine
    from steer_heal.grpo.rollout import SteerState, make_rollout_func
    from steer_heal.steering import extract_vector
    from steer_heal.student import Student

    st = Student(tiny.model, tiny.tokenizer, 4, 8, (0.0, 1.0), ["q_proj", "v_proj"])
    st.bake()
    tok = tiny.tokenizer
    v = extract_vector(st.model, tok, "You are kind.", "You are cruel.", ["hi", "tell me a story", "why?"], [0, 1])
    state = SteerState(v, 6.0)
    eng = HFEngine(st.model, tok)
    system = "You are kind." if control == "prompt_distil" else None
    fn = make_rollout_func(eng, st, state, max_new_tokens=8, temperature=0.0, steered=not control, system=system)
    return st, tok, state, eng, fn


def test_online_placebo_rollouts_are_unsteered(tiny):
    from steer_heal.engine import Sampling

    st, tok, state, eng, fn = _rollout_setup(tiny, "placebo")
    out = fn([[{"role": "user", "content": u}] for u in USERS], _trainer())
    rendered = [render_prompt(tok, u) for u in USERS]
    with st.live_off():
        plain = eng.generate(rendered, None, Sampling(max_new_tokens=8, temperature=0.0))
        steered = eng.generate(rendered, state.steering, Sampling(max_new_tokens=8, temperature=0.0))
    assert out["completion_ids"] == [r.completion_ids for r in plain]
    assert out["completion_ids"] != [r.completion_ids for r in steered]


def test_online_prompt_distil_loss_reads_the_plain_prompt(tiny):
    """The rollouts come from the persona prompt; the ids TRL builds the loss from are the plain
    prompt's followed by those completions."""
    from steer_heal.engine import Sampling

    st, tok, state, eng, fn = _rollout_setup(tiny, "prompt_distil")
    out = fn([[{"role": "user", "content": u}] for u in USERS], _trainer())
    with st.live_off():
        persona = eng.generate([render_prompt(tok, u, system="You are kind.") for u in USERS], None,
                               Sampling(max_new_tokens=8, temperature=0.0))
        plain = eng.generate([render_prompt(tok, u) for u in USERS], None, Sampling(max_new_tokens=8, temperature=0.0))
    assert out["completion_ids"] == [r.completion_ids for r in persona]
    assert out["completion_ids"] != [r.completion_ids for r in plain]
    assert out["prompt_ids"] == [encode_prompt(tok, render_prompt(tok, u)) for u in USERS]
    assert all(p != r.prompt_ids for p, r in zip(out["prompt_ids"], persona))


def test_online_placebo_run_keeps_dose_zero(tiny_dir, mfv_dir, tmp_path):
    """A placebo online run: no calibration, no dose controller, every bake row at kappa 0."""
    from trl import GRPOConfig, TrlParser

    from steer_heal.grpo.online import OnlineConfig, OnlineRun

    cfg, args = TrlParser((OnlineConfig, GRPOConfig)).parse_args_and_config(
        args=["--config", str(ROOT / "recipes/configs/grpo_smoke.yaml"), "--model", str(tiny_dir["llama"]),
              "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--bake_every", "1", "--mfv", "false",
              "--disable_tqdm", "true", "--control", "placebo"])
    run = OnlineRun(cfg, args, seed=args.seed)
    run.setup()
    tr = run.trainer()
    assert tr.controller is None
    tr.train()
    rows = run.rd.rows()
    assert [r["kappa"] for r in rows] == [0.0, 0.0]
    events = [json.loads(x)["event"] for x in open(tmp_path / "run" / "events.jsonl")]
    assert "calibrated" not in events and "control" in events


def test_prompt_distil_with_kd_is_refused_in_one_line():
    from trl import GRPOConfig

    from steer_heal.config import RunConfig
    from steer_heal.grpo.objective import OnlineConfigError
    from steer_heal.grpo.online import check_online_config

    cfg = RunConfig(control="prompt_distil")
    cfg.online.objective = "kd"
    with pytest.raises(OnlineConfigError, match="fix: objective nll"):
        check_online_config(cfg, GRPOConfig(output_dir="/tmp/x", use_cpu=True, beta=0.0))
    # a kd / opd placebo would be the untrained model (teacher = student at dose 0): refused, in the
    # run and already when a comparison config asks for it
    cfg.control = "placebo"
    with pytest.raises(OnlineConfigError, match="fix: compare the arm with base"):
        check_online_config(cfg, GRPOConfig(output_dir="/tmp/x", use_cpu=True, beta=0.0))


def test_unknown_control_is_refused(tiny_cfg):
    from steer_heal import stages
    from steer_heal.config import ConfigError

    tiny_cfg.control = "placbo"
    with pytest.raises(ConfigError, match="'placbo' is not allowed; fix: use one of '', placebo, prompt_distil"):
        stages.build(tiny_cfg, engine_seed=0)
