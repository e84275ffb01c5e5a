import torch

from steer_heal.chat import render_prompt
from steer_heal.engine import HFEngine, Sampling
from steer_heal.logprobs import completion_logprobs, pack
from steer_heal.steering import Steering, SteeringVector, extract_vector

USERS = ["hi", "tell me a story about a river and a teacher", "what is 2+2", "help me write a note to a neighbour",
         "why", "Once upon a time there was a cat who liked books. Continue the story for me please."]


def test_batched_greedy_equals_sequential(tiny_any):
    m, tok = tiny_any.model, tiny_any.tokenizer
    prompts = [render_prompt(tok, u) for u in USERS]
    v = SteeringVector([0], torch.randn(1, m.config.hidden_size))
    s = Steering(v, 1.5)
    batched = HFEngine(m, tok, batch_size=6).generate(prompts, s, Sampling(max_new_tokens=10, temperature=0))
    single = HFEngine(m, tok, batch_size=1).generate(prompts, s, Sampling(max_new_tokens=10, temperature=0))
    agree = sum(a.completion_ids == b.completion_ids for a, b in zip(batched, single))
    assert agree >= 5, [(a.completion_ids, b.completion_ids) for a, b in zip(batched, single)]
    for a, b in zip(batched, single):
        if a.completion_ids == b.completion_ids:
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_logprobs_match_teacher_forced_naive(tiny):
    m, tok = tiny.model, tiny.tokenizer
    prompts = [render_prompt(tok, u) for u in USERS[:3]]
    ro = HFEngine(m, tok).generate(prompts, None, Sampling(max_new_tokens=8, temperature=1.0, seed=3))
    for r in ro:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            lp = torch.log_softmax(m(input_ids=ids).logits[0].double(), -1)
        ref = [float(lp[len(r.prompt_ids) + t - 1, tok_]) for t, tok_ in enumerate(r.completion_ids)]
        assert torch.allclose(torch.tensor(r.logprobs).double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4)


def test_steering_changes_output_and_sampling_is_seeded(tiny):
    m, tok = tiny.model, tiny.tokenizer
    prompts = [render_prompt(tok, u) for u in USERS]
    v = extract_vector(m, tok, "You are kind.", "You are cruel.", USERS, [0, 1])
    eng = HFEngine(m, tok)
    g = Sampling(max_new_tokens=8, temperature=0)
    plain = [r.completion_ids for r in eng.generate(prompts, None, g)]
    steered = [r.completion_ids for r in eng.generate(prompts, Steering(v, 8.0), g)]
    assert plain != steered
    s1 = eng.generate(prompts, None, Sampling(max_new_tokens=8, seed=7))
    s2 = eng.generate(prompts, None, Sampling(max_new_tokens=8, seed=7))
    s3 = eng.generate(prompts, None, Sampling(max_new_tokens=8, seed=8))
    assert [r.completion_ids for r in s1] == [r.completion_ids for r in s2]
    assert [r.completion_ids for r in s1] != [r.completion_ids for r in s3]


def test_completion_stops_at_eos_and_pack_masks(tiny):
    tok = tiny.tokenizer
    b = pack([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], tok.pad_token_id)
    assert b.completion_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    bi, si, tgt = b.targets()
    assert tgt.tolist() == [9, 10, 11, 12, 13]
    lps = completion_logprobs(tiny.model, b)
    assert [len(x) for x in lps] == [2, 3]
