"""Shared prefill (steer_heal.kvcache): the tokens rows share run once, and every row's numbers equal a
plain left-padded batch's."""
import torch

from steer_heal.chat import encode_prompt, render_prompt
from steer_heal.engine.base import Sampling
from steer_heal.engine.hf import HFEngine
from steer_heal.kvcache import share_groups, shared_prefill, sliding_window
from steer_heal.logprobs import left_pad
from steer_heal.models import causal_lm


def test_share_groups_by_hand():
    common = [1, 2, 3]
    a = list(range(100, 120))  # a 20-token head two rows share, then each row's own tokens
    rows = [common + a + [7, 8], common + a + [9], common + [5, 6, 7], common + a[:10] + [4]]
    k0, group, ends = share_groups(rows, min_head=16)
    assert k0 == 3
    assert group == [0, 0, 1, 2]  # the third and fourth rows share only 10 tokens past k0 (< 16)
    assert ends == [3 + 20, 3, 3]  # groups of one get no head
    # identical rows: all but the last token is common; each row keeps its last token
    k0, group, ends = share_groups([common + a] * 3, min_head=16)
    assert k0 == len(common + a) - 1 and ends == [k0] * 3
    # two prompts, two rows each (GRPO groups): one head per prompt
    k0, group, ends = share_groups([common + a, common + [5] + a, common + a, common + [5] + a], min_head=16)
    assert (k0, group, ends) == (3, [0, 1, 0, 1], [3 + 19, 3 + 20])


def _rows(tok):
    story = ("A neighbour finds a wallet on the pavement, full of cash and cards, and thinks about what "
             "to do with it while the owner is nowhere to be seen")
    users = [f"{story}. Options: keep it, hand it in.", f"{story}. Options: hand it in, keep it.",
             "Is lying ever fine?", "Should a judge be strict?"]
    return [encode_prompt(tok, render_prompt(tok, u)) for u in users]


def test_shared_prefill_equals_plain_left_padded_batch(tiny_any):
    """The last prompt position's hidden state and greedy completions match the plain batch, while the
    decoder sees fewer prompt positions; a sliding-window model gets no sharing."""
    m, tok = tiny_any.model, tiny_any.tokenizer
    m.eval()
    rows = _rows(tok)
    shared = shared_prefill(m, rows, tok.pad_token_id, min_head=16)
    if sliding_window(m):
        assert shared is None
        return
    ids, att, cache = shared
    k0, group, ends = share_groups(rows, 16)
    assert group == [0, 0, 1, 2] and cache.get_seq_length() == k0 + max(e - k0 for e in ends)
    dec = causal_lm(m).get_decoder()
    C = cache.get_seq_length()
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        h = dec(input_ids=ids[:, C:], attention_mask=att, position_ids=pos[:, C:], past_key_values=cache,
                use_cache=True).last_hidden_state[:, -1]
        inp, patt = left_pad(rows, tok.pad_token_id)
        ref = dec(input_ids=inp, attention_mask=patt,
                  position_ids=(patt.cumsum(-1) - 1).clamp(min=0)).last_hidden_state[:, -1]
    assert torch.allclose(h, ref, atol=1e-5), (h - ref).abs().max()
    # fewer positions through the decoder: the shared head once, not twice
    assert k0 + (ends[0] - k0) + ids.shape[0] * (ids.shape[1] - C) < inp.numel()
    eng = HFEngine(m, tok)
    samp = Sampling(max_new_tokens=12, min_new_tokens=12, temperature=0.0)
    plain, _ = eng.generate_batch(rows, None, samp)
    fast, _ = eng.generate_batch(rows, None, samp, share_prefix=True)
    assert fast == plain
