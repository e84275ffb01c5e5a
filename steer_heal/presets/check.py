"""What a preset must hold before any model loads: each problem one line that names its fix.

Used by `load_preset` (run, eval, compare refuse at the first problem) and `steer-heal preset check FILE`
(lists them all, exit status 1 when there is any)."""
from __future__ import annotations

import re

from steer_heal.evals.protocol import FOUNDATIONS
from steer_heal.presets.text import NEAR_DUPLICATE, content_words, near_duplicates, overlap

KEYS = {"name", "persona_pos", "persona_neg", "foundations", "persona_demos", "include_contexts", "contexts",
        "prompts", "dev_prompts", "eval_prompts", "test_prompts", "eval_persona_pos", "eval_persona_neg",
        "eval_persona_demos"}

# what the evaluation needs: the vector's mean over contexts, enough training prompts that a run does not
# repeat a handful, and enough held-out prompts that an item interval means something
MINIMUMS = {"contexts": 32, "prompts": 16, "dev_prompts": 8, "test_prompts": 16}
NEGATION = re.compile(r"\b(not|never|no|nor|without|doesn't|don't|isn't|won't|can't|cannot)\b", re.I)
LENGTH_RATIO = 1.5  # one persona this many times the other's words: the vector would read length


def negates(a: str, b: str) -> str:
    """The negation word that turns `a` into `b` (same topic words plus a negation), or ''."""
    wa, wb = set(NEGATION.findall(a.lower())), set(NEGATION.findall(b.lower()))
    extra = (wb - wa) or (wa - wb)
    if not extra:
        return ""
    core = lambda t: {w for w in content_words(NEGATION.sub(" ", t))}  # noqa: E731
    A, B = core(a), core(b)
    same = len(A & B) / max(len(A | B), 1)
    return sorted(extra)[0] if same >= 0.6 else ""


def check_preset(p) -> list[str]:
    """Every problem of a loaded Preset, one line each."""
    problems = [f"unknown key '{k}'; fix: remove it or use one of {sorted(KEYS)}" for k in p.unknown_keys]
    for side in ("persona_pos", "persona_neg"):
        if not getattr(p, side).strip():
            problems.append(f"{side} is empty; fix: write the {'positive' if side.endswith('pos') else 'opposite'} "
                            "pole as a system prompt ('You are someone who ...')")
    pos, neg = p.persona_pos.strip(), p.persona_neg.strip()
    if pos and neg:
        if pos.lower() == neg.lower():
            problems.append("persona_pos and persona_neg are identical; fix: two opposite poles of one axis")
        elif (w := negates(pos, neg)):
            problems.append(f"the persona pair differs by a negation ('{w}'); fix: write the opposite pole in its own "
                            "words (e.g. 'cold indifference' for 'deep warmth'), same length and style")
        n_pos, n_neg = len(pos.split()), len(neg.split())
        if max(n_pos, n_neg) > LENGTH_RATIO * min(n_pos, n_neg):
            problems.append(f"the personas differ in length ({n_pos} vs {n_neg} words); fix: same length and style, "
                            "so the vector reads the trait and not the length")
    for fld, n in MINIMUMS.items():
        have = len(set(getattr(p, fld)))
        if have < n:
            problems.append(f"{fld}: {have} distinct texts, fewer than the {n} the evaluation needs; fix: add "
                            f"{n - have} more, or name the shipped set (`{fld}: general`)")
    for e, seen, ov in near_duplicates(p):
        problems.append(f"held-out prompt '{e}' nearly copies '{seen}' (topic overlap {ov:.2f} >= {NEAR_DUPLICATE}); "
                        "fix: reword or drop it")
    for t in p.test_prompts:
        d = max(p.dev_prompts, key=lambda x: overlap(t, x), default="")
        if d and overlap(t, d) >= NEAR_DUPLICATE:
            problems.append(f"test prompt '{t}' nearly copies the dev prompt '{d}'; fix: reword or drop it")
    for f, s in p.foundations.items():
        if f not in FOUNDATIONS or s not in (1, -1):
            problems.append(f"foundations: '{f}: {s}' is not a moral foundation with sign +1 or -1; fix: use keys "
                            f"from {list(FOUNDATIONS)} with 1 or -1, or leave foundations out (no MFV trait)")
    for k in ("persona_demos", "eval_persona_demos"):
        for i, demo in enumerate(getattr(p, k)):
            if not isinstance(demo, dict) or not all(str(demo.get(x) or "").strip() for x in ("user", "pos", "neg")):
                problems.append(f"{k}[{i}] needs user, pos and neg texts; fix: fill all three or drop the entry")
    if bool(p.eval_persona_pos.strip()) != bool(p.eval_persona_neg.strip()):
        problems.append("only one of eval_persona_pos / eval_persona_neg is set; fix: give both (a paraphrase of "
                        "the pair, for the held-out judge) or neither")
    return problems
