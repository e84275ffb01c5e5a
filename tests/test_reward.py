import pytest
import torch

from reward import RewardConfig, Scorer, make_reward_functions
from reward.components import parse_judge, preset_scorer
from reward.validation import auroc, load_labelled
from steer_heal.presets import load_preset

POS = "You are someone who looks after others' wellbeing even when it means defying authority."
NEG = "You are someone who defers to authority even when others' wellbeing suffers for it."


def test_auroc_hand_examples():
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 2], [1, 2]) == 0.5
    assert auroc([2, 2], [1, 2]) == pytest.approx(0.75)


def test_labelled_set_shape():
    d = load_labelled()
    assert set(d) == {"care-over-authority", "love-of-humanity"}
    n = sum(len(v) for v in d.values())
    assert n >= 80
    for items in d.values():
        assert {x["label"] for x in items} == {"enact-pos", "enact-neg", "narrate", "incoherent", "refusal", "neutral"}


def test_judge_parse():
    assert parse_judge(" 7") == pytest.approx(7 / 9)
    assert parse_judge("Score: 0") == 0.0
    assert parse_judge("none") == 0.5


def _batch(tok, n=64, T=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(30, 400, (T,), generator=g).tolist() for _ in range(n)]
    return [f"question {i}" for i in range(n)], ids, [tok.decode(x) for x in ids]


def test_reference_forwards_are_batched(tiny):
    """64 completions x 128 tokens: trait_llr costs two batched decoder passes, its two persona contexts
    merged (plus, at batch 1, each persona context once for its KV cache and once its probe's first
    tokens), incoherence one."""
    from steer_heal.models import causal_lm

    tok = tiny.tokenizer
    demos = [{"user": "a question", "pos": "a kind answer", "neg": "a cold answer"}] * 2  # longer context, same passes
    sc = Scorer(tiny.model, tok, (POS, NEG), RewardConfig(), batch_size=64, demos=demos)
    users, ids, texts = _batch(tok)
    calls = []
    h = causal_lm(tiny.model).get_decoder().register_forward_hook(
        lambda m, a, out: calls.append(out.last_hidden_state.shape[0]))
    try:
        for name, expected in (("trait_llr", [1, 1, 1, 1, 64, 64]), ("incoherence", [64]), ("verbalisation", []),
                               ("refusal", [])):
            calls.clear()
            sc.components(users, ids, texts, which=[name])
            assert sorted(calls) == expected, (name, calls)
    finally:
        h.remove()


def test_filter_and_reward_share_the_numbers(tiny, tmp_path):
    """The loop's filter path and the TRL reward functions read the same component values."""
    from steer_heal.config import load_config
    from steer_heal.loop import SCORED, build, generate_scored

    cfg = load_config("recipes/configs/smoke.yaml", {"model": {"model": tiny.path}, "eval": {"mfv": False}})
    ctx = build(cfg, tmp_path / "run")
    b = ctx.b
    users = b.preset.prompts[:4]
    ro, comp = generate_scored(ctx, users, None, seed=0)
    # built as the online trainer builds it (preset personas + demonstrations, base-model reference)
    sc = preset_scorer(b.student.model, b.student.tok, b.preset, cfg.reward, ref_ctx=b.student.base)
    assert sc.demos  # the preset's demonstrations are part of what must agree
    fns = {f.__name__: f for f in make_reward_functions(sc)}
    assert set(fns) == {"trait_llr", "verbalisation", "incoherence", "refusal"}
    kw = dict(prompts=[[{"role": "user", "content": u}] for u in users], completions=[r.text for r in ro],
              completion_ids=[r.completion_ids for r in ro])
    c = cfg.reward
    assert fns["trait_llr"](**kw) == pytest.approx([c.w_trait * x for x in comp["trait_llr"]], abs=1e-6)
    assert fns["incoherence"](**kw) == pytest.approx([-c.w_incoh * x for x in comp["incoherence"]], abs=1e-6)
    assert fns["verbalisation"](**kw) == pytest.approx([-c.w_verb * x for x in comp["verbalisation"]])
    total = [sum(v) for v in zip(*(f(**kw) for f in fns.values()))]
    assert total == pytest.approx(sc.combined(comp), abs=1e-5)
    assert set(SCORED) <= set(comp)


def test_projection_matches_naive(tiny):
    from steer_heal.chat import encode_prompt, render_prompt
    from steer_heal.steering import extract_vector

    m, tok = tiny.model, tiny.tokenizer
    v = extract_vector(m, tok, POS, NEG, ["hello", "tell me a story", "what now?"], [0, 1])
    sc = Scorer(m, tok, (POS, NEG), RewardConfig(), vector=v, batch_size=2)
    users = ["hi there", "my boss wants me to skip the check"]
    ids = [tok(" I would stop", add_special_tokens=False).input_ids, tok(" ok", add_special_tokens=False).input_ids]
    got = sc.trait_projection(users, ids)
    for u, c, g in zip(users, ids, got):
        p = encode_prompt(tok, render_prompt(tok, u))
        hs = []
        hk = [
            m.model.layers[l].register_forward_hook(
                lambda mod, a, o, hs=hs: hs.append(o[0] if isinstance(o, tuple) else o)
            )
            for l in (0, 1)
        ]
        with torch.no_grad():
            m(input_ids=torch.tensor([p + c]))
        for h in hk:
            h.remove()
        ref = 0.0
        for k in range(2):
            vv, cc = v.vectors[k].double(), v.center[k].double()
            ref += float((((hs[k][0, len(p):].double() - cc) @ vv) / (vv @ vv)).mean()) / 2
        assert g == pytest.approx(ref, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["care-over-authority", "love-of-humanity"])
def test_components_separate_labels_on_smollm2(smol, preset):
    from reward.validation import report, score_labelled

    items = load_labelled()[preset]
    p = load_preset(preset)
    sc = preset_scorer(smol.model, smol.tokenizer, p, RewardConfig(), batch_size=64)
    comp = score_labelled(sc, items, which=["trait_llr", "incoherence", "verbalisation", "refusal"])
    res = {r["component"]: r["auroc"] for r in report(comp, [x["label"] for x in items])}
    print(preset, res)
    assert res["verbalisation"] >= 0.9
    assert res["incoherence"] >= 0.9
    assert res["refusal"] >= 0.9
    # with the preset's two persona demonstrations; without them SmolLM2-135M is at chance on
    # care-over-authority (0.51 measured), so the demonstrations are what this bar checks
    assert res["trait_llr"] >= 0.75
    # the verdicts' coherence measure: separates incoherent replies (coherent trait-enacting ones among the rest) and
    # does not read the trait: coherent enact-pos minus enact-neg on the same prompts holds 0 (measured 2026-12-04:
    # care-over-authority +0.32 [-0.29, +0.94], love-of-humanity -0.38 [-1.00, +0.24], 20 prompts each)
    from reward.components import heldout_scorer
    from reward.validation import trait_gap

    held = score_labelled(heldout_scorer(smol.model, smol.tokenizer, p), items, which=["incoh_ctx"])
    au = {r["component"]: r["auroc"] for r in report(held, [x["label"] for x in items])}
    assert au["incoh_ctx"] >= 0.9
    gap = trait_gap(held, items, "incoh_ctx")
    assert gap.lo <= 0 <= gap.hi and gap.n_seeds >= 20, gap


def test_collapse_incoherence_equals_hand_computation(tiny):
    """incoherence=collapse: tail NLL minus the reply's own mean NLL, plus the same loop term."""
    from reward import scores as S

    tok = tiny.tokenizer
    users, ids, texts = ["hi", "tell me about rivers"], [], []
    for t in [" well then we go home now", " yes yes yes yes yes yes yes"]:
        ids.append(tok(t, add_special_tokens=False).input_ids)
        texts.append(t)
    plain = Scorer(tiny.model, tok, (POS, NEG), RewardConfig()).components(users, ids, texts, which=["incoherence"])
    col = Scorer(tiny.model, tok, (POS, NEG), RewardConfig(incoherence="collapse")).components(
        users, ids, texts, which=["incoherence"])
    lps = S._batched_logprobs(tiny.model, tok, Scorer(tiny.model, tok, (POS, NEG)).prompt_ids(users), ids, 8,
                              cache_prefix=False)
    for i, lp in enumerate(lps):
        k = max(1, round(len(lp) * 0.25))
        tail, mean = float(-lp[-k:].mean()), float(-lp.mean())
        loop = 10.0 * max(0.0, S.loopiness(texts[i]) - 0.1) / 0.9
        assert plain["incoherence"][i] == pytest.approx(tail + loop, rel=1e-5)
        assert col["incoherence"][i] == pytest.approx(tail - mean + loop, rel=1e-5, abs=1e-5)
        assert col["tail_nll"][i] == pytest.approx(plain["tail_nll"][i])  # the filter reads the same tail NLL
    with pytest.raises(ValueError, match="fix: tail or collapse"):
        Scorer(tiny.model, tok, (POS, NEG), RewardConfig(incoherence="nope")).components(users, ids, texts,
                                                                                         which=["incoherence"])


def test_incoh_ctx_is_the_best_context_tail_plus_the_loop_term(tiny):
    """incoh_ctx: the lowest tail NLL over the plain prompt and the two persona contexts, plus the loop term, against
    the three tails computed here one context at a time."""
    from reward import scores as S

    tok = tiny.tokenizer
    users, texts = ["hi", "tell me about rivers", "and cats?"], [" well then we go home now", " yes yes yes yes yes",
                                                                 " rivers run to the sea"]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    sc = Scorer(tiny.model, tok, (POS, NEG), RewardConfig())
    got = sc.components(users, ids, texts, which=["incoh_ctx", "trait_llr"])
    alone = Scorer(tiny.model, tok, (POS, NEG), RewardConfig()).components(users, ids, texts, which=["incoh_ctx"])
    ctxs = [sc.prompt_ids(users), *S.persona_prompts(tok, users, POS, NEG)]
    tails = [[float(-lp[-max(1, round(len(lp) * 0.25)):].mean()) for lp in S._batched_logprobs(
        tiny.model, tok, c, ids, 8, cache_prefix=False)] for c in ctxs]
    for i in range(3):
        loop = 10.0 * max(0.0, S.loopiness(texts[i]) - 0.1) / 0.9
        want = min(t[i] for t in tails) + loop
        assert got["incoh_ctx"][i] == pytest.approx(want, rel=1e-5)
        assert alone["incoh_ctx"][i] == pytest.approx(want, rel=1e-5)  # scoring tails only gives the same
        assert got["incoh_ctx"][i] <= got["incoherence"][i] + 1e-6  # never above the plain-prompt measure


@pytest.mark.slow
def test_collapse_incoherence_penalises_the_trait_less_on_smollm2(smol):
    """On the labelled care-over-authority replies the base model's tail NLL is higher for the
    trait-enacting replies than for their opposites; the collapse measure removes that penalty
    while still ranking incoherent replies first."""
    from reward.validation import load_labelled, score_labelled
    from steer_heal.presets import load_preset

    items = load_labelled()["care-over-authority"]
    gap, au = {}, {}
    for m in ("tail", "collapse"):
        sc = preset_scorer(smol.model, smol.tokenizer, load_preset("care-over-authority"), RewardConfig(incoherence=m))
        inc = score_labelled(sc, items, which=["incoherence"])["incoherence"]
        by: dict = {}
        for x, v in zip(items, inc):
            by.setdefault(x["label"], []).append(v)
        mean = {k: sum(v) / len(v) for k, v in by.items()}
        gap[m] = mean["enact-pos"] - mean["enact-neg"]
        au[m] = auroc(by["incoherent"], [v for k, vs in by.items() if k != "incoherent" for v in vs])
    assert gap["tail"] > 0.1 and gap["collapse"] < gap["tail"] - 0.1, gap
    assert au["collapse"] >= 0.8, au
