"""One declared setting: a dataclass field with its default, its help text, the modes that read it and
the values it allows. Every settings dataclass uses it (config.py, reward.RewardConfig,
engine.VLLMConfig), so the online recipe's flat arguments carry the same help (config.flat_dataclass)
and both loaders refuse a bad value before any model loads (config.check_settings)."""
from __future__ import annotations

import copy
from dataclasses import field
from pathlib import Path

import yaml

ITERATIVE, ONLINE = "iterative", "online"
BOTH = (ITERATIVE, ONLINE)


class SettingError(ValueError):
    """A value a setting does not allow, or a config file that does not parse; the message names the fix."""


def setting(default, help: str, modes: tuple[str, ...] = BOTH, *, choices: tuple | None = None,
            lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """The iterative loop reads a setting as `section.name`, the online recipe as the flat `name`.
    `choices`: the allowed values; `lo` / `hi`: the allowed range (closed unless `lo_open` / `hi_open`),
    applied to each element of a list or tuple."""
    meta = {"help": help, "modes": modes, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open,
            "hi_open": hi_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def allowed(meta) -> str:
    """The allowed values of a setting, in words ('' when it allows anything of its type)."""
    if meta.get("choices") is not None:
        return "one of " + ", ".join(repr(c) if c == "" else str(c) for c in meta["choices"])
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        return f"{'(' if meta.get('lo_open') else '['}{lo:g}, {hi:g}{')' if meta.get('hi_open') else ']'}"
    if lo is not None:
        return f"{'>' if meta.get('lo_open') else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if meta.get('hi_open') else '<='} {hi:g}"
    return ""


def bad_value(meta, value) -> bool:
    """Whether `value` (each element of a list / tuple) is outside the setting's choices or range."""
    if isinstance(value, (list, tuple)):
        return any(bad_value(meta, v) for v in value)
    if meta.get("choices") is not None:
        return value not in meta["choices"]
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        return True
    if hi is not None and (value >= hi if meta.get("hi_open") else value > hi):
        return True
    return value != value  # NaN


def check_value(key: str, value, meta) -> None:
    if bad_value(meta, value):
        raise SettingError(f"config key '{key}': {value!r} is not allowed; fix: use {allowed(meta)}")


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; a syntax error is one line with the file and the line."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SettingError(f"{where}: YAML syntax error ({what}); fix: correct that line of {p.name}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingError(f"{p}: expected a mapping of key: value lines, got a {type(data).__name__}; fix: write "
                           "it as `key: value` lines")
    return data
