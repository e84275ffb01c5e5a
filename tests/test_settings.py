"""Every declared setting is checked where it is declared (issue 44 item 5): choices and ranges refused in one
line naming the key, the value and the allowed ones, by both loaders, before any model loads; a YAML syntax
error is one line with the file and the line."""
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from steer_heal.config import ONLINE, ConfigError, RunConfig, check_settings, flat_name, from_flat, leaves, load_config
from steer_heal.setting import SettingError, allowed, read_yaml

ROOT = Path(__file__).resolve().parents[1]


def _bad(meta, tp):
    """A value outside the setting's choices or range, of the setting's own type."""
    if meta.get("choices") is not None:
        v = "not-a-choice"
    elif meta.get("lo") is not None:
        v = meta["lo"] if meta.get("lo_open") else meta["lo"] - 1
    else:
        v = meta["hi"] if meta.get("hi_open") else meta["hi"] + 1
    origin = typing.get_origin(tp)
    if origin is list:
        return [v]
    if origin is tuple:
        return (v, v)
    return v


def _checked():
    out = [(path, f, tp) for path, f, tp in leaves() if f.metadata.get("choices") is not None
           or f.metadata.get("lo") is not None or f.metadata.get("hi") is not None]
    assert len(out) >= 60  # the loaders check most settings: the rest are free text (model ids, paths)
    return out


def test_defaults_pass():
    check_settings(RunConfig())
    check_settings(RunConfig(), ONLINE)


@pytest.mark.parametrize("path,f,tp", _checked(), ids=lambda x: ".".join(x) if isinstance(x, tuple) else "")
def test_every_setting_refuses_a_bad_value_in_one_line(path, f, tp):
    bad = _bad(f.metadata, tp)
    key = ".".join(path)
    nested: dict = {}
    node = nested
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = list(bad) if isinstance(bad, tuple) else bad
    with pytest.raises(ConfigError) as e:
        load_config(None, nested)
    msg = str(e.value)
    assert "\n" not in msg and f"'{key}'" in msg and allowed(f.metadata) in msg and "fix:" in msg, msg
    if ONLINE in f.metadata["modes"]:  # the online recipe's flat name, through the same check
        with pytest.raises(ConfigError) as e:
            from_flat({flat_name(path): bad})
        assert f"'{flat_name(path)}'" in str(e.value) and "\n" not in str(e.value)


def test_the_issues_bad_inputs_are_refused_before_any_model():
    for ov, fix in ((["rounds=-3"], ">= 1"), (["heal.kl_agg=median"], "one of rmse, mean, p95, max"),
                    (["online.rollout_alphas=[-1.0]"], ">= 0")):
        with pytest.raises(ConfigError, match=fix):
            load_config("recipes/configs/demo.yaml", ov)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrounds: 2\nheal: {kl_beta: 0.3\nseed: 4\n")
    with pytest.raises(SettingError) as e:
        read_yaml(bad)
    msg = str(e.value)
    assert "\n" not in msg and f"{bad}:" in msg and "YAML syntax error" in msg and "fix:" in msg
    line = int(msg.split(f"{bad}:")[1].split(":")[0])
    assert 3 <= line <= 4  # the unclosed mapping opens on line 3; the parser notices on the next line
    with pytest.raises(SettingError, match="YAML syntax error"):
        load_config(bad)


@pytest.mark.parametrize("cmd", ["run", "compare", "online"])
def test_entry_points_print_one_line_for_a_broken_yaml(cmd, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\n  - oops: [\n")
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    argv = {"run": [sys.executable, "-m", "steer_heal.cli", "run", "--config", str(bad)],
            "compare": [sys.executable, "-m", "steer_heal.cli", "compare", "--config", str(bad)],
            "online": [sys.executable, str(ROOT / "recipes/grpo_heal.py"), "--config", str(bad)]}[cmd]
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "YAML syntax error" in err[0] and str(bad) in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_every_example_in_the_help_texts_parses(tmp_path):
    """`e.g. key=value ...` in any --help text of steer-heal is accepted by the parser it documents."""
    import argparse
    import re

    from steer_heal.cli import build_parser
    from steer_heal.study.config import load_compare

    def helps(parser):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from ((f"{name} {n}".strip(), h) for n, h in helps(sub))
            elif a.help:
                yield "", a.help

    examples = []
    for where, h in helps(build_parser()):
        for m in re.finditer(r"e\.g\. ((?:[\w.]+=\S+\s?)+)", h):
            examples.append((where.split()[0] if where else "", m.group(1).split()))
    assert {w for w, _ in examples} >= {"run", "compare"}, examples
    study = ROOT / "recipes/compare/smollm2_cpu.yaml"
    for where, items in examples:
        items = [x.rstrip(",)") for x in items]
        if where == "compare":
            load_compare(str(study), items)
        else:
            load_config("recipes/configs/demo.yaml", items)
