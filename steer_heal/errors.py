"""The entry points' error wrapper: steer-heal's own errors carry their fix and print as one line."""
from __future__ import annotations

import sys


def one_line_errors(fn, *args) -> int:
    """Run an entry point; an error raised by steer_heal or reward prints `error: ...` (one line, no
    traceback) and exits 2. Anything else is a bug and keeps its traceback."""
    try:
        return fn(*args)
    except (ValueError, RuntimeError, OSError) as e:
        if type(e).__module__.startswith(("steer_heal", "reward")):
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        raise
