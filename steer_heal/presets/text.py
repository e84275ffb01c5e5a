"""Topic-word overlap: the near-duplicate rule between held-out prompts and anything a run conditions on."""
from __future__ import annotations

import re

# words that carry no topic: function words and the question templates every prompt set shares
_STOP = set("""a an the and or but if of to in on at for with about from by as into over after before than then so
i me my you your we our they them their he him his she her it its this that these those who whom what which when where
why how is are was were be been being do does did have has had will would can could should may might must shall
not no yes any some all just very really ever never still also there here one ones thing things
think thinks thought feel feels felt say says said tell tells describe make makes made give gives write
someone somebody person people anyone everyone""".split())


def content_words(text: str) -> set[str]:
    ws = re.findall(r"[a-z0-9]+", text.lower().replace("'", ""))
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in ws if w not in _STOP}


def overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two texts' topic words (function words and question templates left out)."""
    A, B = content_words(a), content_words(b)
    return len(A & B) / max(len(A | B), 1)


NEAR_DUPLICATE = 0.35  # overlap at or above this: an eval prompt too close to something the runs saw


def near_duplicates(p, threshold: float = NEAR_DUPLICATE) -> list[tuple[str, str, float]]:
    """(eval prompt, the seen text it nearly copies, overlap) for every dev or test prompt of a Preset at or over
    threshold."""
    seen = p.seen()
    out = []
    for e in p.dev_prompts + p.test_prompts:
        best = max(seen, key=lambda o: overlap(e, o), default="")
        if best and overlap(e, best) >= threshold:
            out.append((e, best, overlap(e, best)))
    return out
