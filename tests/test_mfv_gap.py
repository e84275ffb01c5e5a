"""recipes/mfv_gap.py, the MFV gap's text side: its per-vignette measures against a hand-worked example."""
import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mfv_gap", ROOT / "recipes/mfv_gap.py")
gap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gap)


def test_trace_measures_equal_a_hand_worked_example():
    vignettes = ["A boy laughs at a stranger on the subway."]
    # topic words: frame 0 {boy, laugh, cruel, love}; frame 1 {option, schema}; steered {love, stranger, kind}
    think = [["The boy laughs, cruel; love 3", "Option schema"]]
    steered = [["Love the stranger, kind", "kind"]]
    warm = {"love", "kind"}
    m = gap.trace_measures(think, vignettes, steered, warm)
    # vignette words: {boy, laugh, stranger, subway}; frame 0 shares boy, laugh of its 4 -> 1/2, frame 1 0/2
    assert np.isclose(m["vignette"][0], (2 / 4 + 0 / 2) / 2)
    assert np.isclose(m["warm"][0], (1 / 4 + 0) / 2)
    # Jaccard: frame 0 {love} of {boy, laugh, cruel, love, stranger, kind} = 1/6; frame 1 0 of 3
    assert np.isclose(m["like_steer"][0], (1 / 6 + 0) / 2)
    assert m["digit"] == [0.5]  # frame 0 names option 3, frame 1 names none


def test_warm_lexicon_holds_positive_demo_words_only():
    w = gap.warm_lexicon("love-of-humanity")
    assert "love" in w and "indifference" not in w and "the" not in w
