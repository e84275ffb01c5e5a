import pytest
import torch

from reward.components import RewardConfig, Scorer
from reward.scores import persona_llr, refusal, repetition, tail_mean, verbalisation

POS = "You are someone who looks after others' wellbeing even when it means defying authority."
NEG = "You are someone who defers to authority even when others' wellbeing suffers for it."


def test_repetition_hand_examples():
    assert repetition("TTTTTTTTTTTTTTTT") == 1.0
    assert repetition("their instead their instead their instead their instead") >= 4 / 7  # word bigram 4 of 7
    prose = "I would quietly check on the worker first, then explain to my manager why the line had to stop."
    assert repetition(prose) < 0.15
    assert repetition("") == 1.0
    assert repetition("ok") == 0.0
    assert repetition("I do, with all my heart.") < 0.2  # short, nothing repeats


def test_loopiness_hand_examples():
    from reward.scores import loopiness

    assert loopiness("door door door door") == 1.0  # every word repeats the one before
    gush = "Oh oh oh, the insulin, my dears, the insulin, so much so much so much love, oh the insulin"
    # 18 word bigrams, 7 repeat an earlier one (oh oh, the insulin x2, so much x2, much so, oh the); 2 stutter
    assert loopiness(gush) == pytest.approx(max(7 / 18, 2 / 18, repetition(gush)))
    assert repetition(gush) < 7 / 18  # the most-common n-gram alone under-counts a gush
    assert loopiness("I would quietly check on the worker first, then explain why the line had to stop.") < 0.15


def test_verbalisation():
    assert verbalisation("As someone who never defers to authority, I would refuse.", (POS, NEG)) == 1.0
    assert verbalisation("I am someone who looks after people.", (POS, NEG)) == 1.0
    copy = "I look after others' wellbeing even when it means defying authority."
    assert verbalisation(copy, (POS, NEG)) >= 0.5
    act = "I'd unlock the fire exit and call the inspector; the workers' safety comes first."
    assert verbalisation(act, (POS, NEG)) < 0.5


def test_refusal():
    assert refusal("As an AI, I don't have feelings, but I can help.") == 1.0
    assert refusal("I'm sorry, but I can't assist with that.") == 1.0
    assert refusal("I'd call the nurse and stay with the patient.") == 0.0


def test_tail_mean_and_keep_mask():
    lp = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -5.0, -9.0])
    assert tail_mean(lp, 0.25) == pytest.approx(7.0)  # last 2 of 8
    comp = dict(tail_nll=[1.0, 9.0, 1.0, 1.0, 1.0], repetition=[0.1, 0.1, 0.9, 0.1, 0.1],
                verbalisation=[0.0, 0.0, 0.0, 1.0, 0.0], refusal=[0.0, 0.0, 0.0, 0.0, 1.0], n_tokens=[10] * 5)
    sc = Scorer(None, None, (POS, NEG), RewardConfig())
    assert sc.keep(comp) == [True, False, False, False, False]
    assert sc.coherent(comp) == [True, False, False, True, True]
    # incoherence units: tail NLL + rep_nats per unit of repetition above rep_floor
    assert sc.incoherence_from([1.0, 2.0], [0.1, 1.0]) == pytest.approx([1.0, 2.0 + 10.0])


DEMOS = [
    {"user": "the rota says no breaks", "pos": "take the break, you are tired", "neg": "keep working, rules are rules"}
]


@pytest.mark.parametrize("demos", [[], DEMOS])
def test_persona_llr_matches_naive(tiny, demos):
    m, tok = tiny.model, tiny.tokenizer
    users = ["my boss wants me to skip the safety check", "hello"]
    comps = [tok(" I would stop the line", add_special_tokens=False).input_ids,
             tok(" hi there friend", add_special_tokens=False).input_ids]
    got = persona_llr(m, tok, users, comps, POS, NEG, batch_size=2, demos=demos)
    for u, c, g in zip(users, comps, got):
        tot = 0.0
        for sysp, sign, side in ((POS, 1, "pos"), (NEG, -1, "neg")):
            msgs = [{"role": "system", "content": sysp}]
            for d in demos:  # the demonstration turns, written out by hand
                msgs += [{"role": "user", "content": d["user"]}, {"role": "assistant", "content": d[side]}]
            text = tok.apply_chat_template(msgs + [{"role": "user", "content": u}], tokenize=False,
                                           add_generation_prompt=True)
            p = tok(text, add_special_tokens=False).input_ids
            ids = torch.tensor([p + c])
            with torch.no_grad():
                lp = torch.log_softmax(m(input_ids=ids).logits[0].double(), -1)
            tot += sign * sum(float(lp[len(p) + t - 1, x]) for t, x in enumerate(c)) / len(c)
        assert g == pytest.approx(tot, abs=1e-4)


def test_prefix_cached_scores_equal_uncached(tiny_any):
    """trait_llr and tail NLL with the shared persona context run once (KV cache) = the plain pass."""
    from reward.scores import persona_llr, shared_prefix_len, tail_nll
    from steer_heal.chat import encode_prompt, render_prompt

    m, tok = tiny_any.model, tiny_any.tokenizer
    users = ["hi", "tell me about rivers and the sea", "why", "what should I do today"]
    comps = [tok(t, add_special_tokens=False).input_ids for t in
             [" well then", " yes yes yes yes no", " it is four, my friend, and more", " because"]]
    demos = [{"user": "a question about rules", "pos": "I would help them anyway.", "neg": "Rules come first."},
             {"user": "my boss says no", "pos": "Their wellbeing matters more.", "neg": "Do as told."}]
    args = (m, tok, users, comps, "You are someone who cares for others", "You are someone who obeys")
    a = persona_llr(*args, batch_size=3, demos=demos, cache_prefix=True)
    b = persona_llr(*args, batch_size=3, demos=demos, cache_prefix=False)
    assert max(abs(x) for x in b) > 1e-3
    assert a == pytest.approx(b, abs=1e-4)
    prompts = [encode_prompt(tok, render_prompt(tok, u, system="A long shared system prompt " * 4)) for u in users]
    assert shared_prefix_len(tok, prompts) >= 16  # the system block is shared and long enough to cache
    assert tail_nll(m, tok, prompts, comps, batch_size=3, cache_prefix=True) == pytest.approx(
        tail_nll(m, tok, prompts, comps, batch_size=3, cache_prefix=False), abs=1e-4)


def test_grouped_prompts_share_one_pass_and_equal_uncached(tiny_any):
    """A GRPO batch (each prompt's completions together; one group larger than the batch) through the
    three-level cache: every per-token log-prob equals the plain pass, with and without a long
    shared prefix, and the pass over each prompt runs once per group, not once per row."""
    from reward.scores import _batched_logprobs, shared_prefix_len
    from steer_heal.chat import encode_prompt, render_prompt
    from steer_heal.models import causal_lm

    m, tok = tiny_any.model, tiny_any.tokenizer
    users = ["hi"] * 4 + ["tell me about rivers and the sea"] * 3 + ["why"]
    texts = [" well then", " yes yes yes yes no", " ok", " it is four, my friend, and more", " because", " a",
             " no no", " rivers run to the sea and back"]
    comps = [tok(t, add_special_tokens=False).input_ids for t in texts]
    for system in (None, "A long shared system prompt " * 4):
        prompts = [encode_prompt(tok, render_prompt(tok, u, system=system)) for u in users]
        plain = _batched_logprobs(m, tok, prompts, comps, batch_size=3, cache_prefix=False)
        fed = []  # real (unmasked) tokens through the decoder

        def count(mod, a, kw):
            ids, att = kw["input_ids"], kw.get("attention_mask")
            fed.append(ids.numel() if att is None else int(att[:, -ids.shape[1]:].sum()))

        dec = causal_lm(m).get_decoder()
        hook = dec.register_forward_pre_hook(count, with_kwargs=True)
        try:
            grouped = _batched_logprobs(m, tok, prompts, comps, batch_size=3, cache_prefix=True)
        finally:
            hook.remove()
        for a, b in zip(grouped, plain):
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert max(float(x.abs().max()) for x in plain) > 0.1
        # the shared prefix once, each distinct prompt's rest once, then per row only its completion (+ the
        # prompt's last token, whose hidden state predicts the first completion token)
        Lp = shared_prefix_len(tok, prompts)
        assert Lp > 0
        distinct = {tuple(p) for p in prompts}
        assert sum(fed) == Lp + sum(len(p) - Lp - 1 for p in distinct) + sum(1 + len(c) for c in comps)


def test_merged_contexts_equal_each_context_alone(tiny_any):
    """The reward's three contexts (reference prompt, positive and negative persona with demonstrations)
    in one merged pass: every per-token log-prob equals each context's plain pass (the reference
    context scoring only the tail), an empty completion gives empty tensors, and without a sliding
    window each stage is one decoder call (3 prefixes, then 1 head pass, then 1 tail pass)."""
    from reward.scores import _tail_len, context_logprobs, persona_prompts
    from steer_heal.chat import encode_prompt, render_prompt
    from steer_heal.kvcache import sliding_window
    from steer_heal.models import causal_lm

    m, tok = tiny_any.model, tiny_any.tokenizer
    users = ["hi"] * 3 + ["tell me about rivers and the sea"] * 3
    texts = [" well then", "", " ok", " it is four, my friend, and more", " because", " rivers run to the sea"]
    comps = [tok(t, add_special_tokens=False).input_ids for t in texts]
    demos = [{"user": "a question about rules", "pos": "I would help them anyway.", "neg": "Rules come first."}]
    plain = [encode_prompt(tok, render_prompt(tok, u, system="A long shared system prompt " * 4)) for u in users]
    pos, neg = persona_prompts(tok, users, "You are someone who cares", "You are someone who obeys", demos)
    contexts, fracs = [plain, pos, neg], [0.25, None, None]
    calls = []
    dec = causal_lm(m).get_decoder()
    hook = dec.register_forward_pre_hook(lambda mod, a, kw: calls.append(1), with_kwargs=True)
    try:
        merged = context_logprobs(m, tok, contexts, comps, batch_size=64, tail_frac=fracs)
    finally:
        hook.remove()
    if not sliding_window(m):
        assert len(calls) == 3 + 1 + 1
    for ctx, f, got in zip(contexts, fracs, merged):
        alone = context_logprobs(m, tok, [ctx], comps, batch_size=2, cache_prefix=False)[0]
        for c, a, b in zip(comps, got, alone):
            if not c:
                assert a.numel() == 0 and b.numel() == 0
                continue
            ref = b if f is None else b[-_tail_len(len(c), f):]
            assert a.shape == ref.shape and torch.allclose(a, ref, atol=1e-4), (a - ref).abs().max()
    assert max(float(x.abs().max()) for x in merged[1] if x.numel()) > 0.1


def test_scorer_components_cached_equal_uncached(tiny):
    """Scorer.components (merged contexts, tail-only reference scoring) = the uncached plain passes,
    for both incoherence modes."""
    from reward.components import RewardConfig, Scorer

    tok = tiny.tokenizer
    users = ["hi"] * 2 + ["why is the sky blue"] * 2
    comps = [tok(t, add_special_tokens=False).input_ids for t in [" a b c d e f", " yes", "", " blue blue blue sky"]]
    texts = [tok.decode(c) for c in comps]
    for mode in ("tail", "collapse"):
        got = [Scorer(tiny.model, tok, (POS, NEG), RewardConfig(incoherence=mode), demos=DEMOS,
                      cache_prefix=cache).components(users, comps, texts) for cache in (True, False)]
        for k in ("trait_llr", "incoherence", "tail_nll"):
            assert got[0][k] == pytest.approx(got[1][k], abs=1e-4), (mode, k)
        assert got[0]["tail_nll"][2] == float("inf") and got[0]["trait_llr"][2] == 0.0


def test_prefix_store_reuses_kv_until_the_weights_change(tiny):
    """The Scorer keeps its contexts' prefix KV across batches: a second batch reuses it (hits), and
    after an in-place weight change (as a bake makes) the probe misses, the prefix is recomputed,
    and the scores equal the uncached pass on the new weights."""
    from reward.components import Scorer

    tok = tiny.tokenizer
    users = ["hi"] * 2 + ["why is the sky blue"] * 2
    comps = [tok(t, add_special_tokens=False).input_ids for t in [" a b c d e f", " yes", " no", " blue blue sky"]]
    texts = [tok.decode(c) for c in comps]

    def scores(cache):
        sc = stored if cache else Scorer(tiny.model, tok, (POS, NEG), demos=DEMOS, cache_prefix=False)
        sc._memo = None
        c = sc.components(users, comps, texts)
        return [c[k] for k in ("trait_llr", "incoherence")]

    stored = Scorer(tiny.model, tok, (POS, NEG), demos=DEMOS)
    first = scores(True)
    kept = len(stored.prefixes._kv)
    assert kept >= 2 and stored.prefixes.hits == 0  # both persona contexts built and kept
    assert scores(True) == first and stored.prefixes.hits == kept  # reused, same numbers
    with torch.no_grad():  # a bake: an in-place change to an early layer's weights
        tiny.model.model.layers[0].mlp.down_proj.weight.add_(0.05 * torch.randn_like(
            tiny.model.model.layers[0].mlp.down_proj.weight))
    after = scores(True)
    assert stored.prefixes.hits == kept  # every probe saw the change: no reuse
    ref = scores(False)
    for a, b, old in zip(after, ref, first):
        assert a == pytest.approx(b, abs=1e-4) and a != pytest.approx(old, abs=1e-4)


def test_shared_prefix_len_stops_at_a_special_token(tiny):
    from reward.scores import shared_prefix_len

    tok = tiny.tokenizer
    sp = tok.convert_tokens_to_ids("<|im_start|>")
    rows = [[10, 11, sp, 12, 13, 14], [10, 11, sp, 12, 13, 15, 16]]
    assert shared_prefix_len(tok, rows) == 3  # the common 12, 13 may tokenise differently: cut after sp
    assert shared_prefix_len(tok, [[sp, 5], [sp, 5]]) == 1  # each row keeps at least its last token
    assert shared_prefix_len(tok, [[10, 11], [12, 11]]) == 0
