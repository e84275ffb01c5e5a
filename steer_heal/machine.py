"""Which machine this is, for numbers that only mean something on the machine that timed them (the
tinymfv batch-1 time the MFV speed-up divides by). Standard library only: the tinymfv fixture script
loads this file by path from tinymfv's own venv."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

TIMINGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "machine_timings.json"


def machine_key() -> str:
    """CPU model and logical core count: the same key on every run on one machine."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def load_timing(name: str, path: Path = TIMINGS) -> dict | None:
    """The record `name` stored for this machine ({seconds, date, origin, ...}), or None."""
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(machine_key(), {}).get(name)


def store_timing(name: str, record: dict, path: Path = TIMINGS) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(machine_key(), {})[name] = record
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
