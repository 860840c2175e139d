"""model/kernels/attention.py against masked softmax attention in torch (float32 on the CPU, in
Triton's interpreter): results, batch invariance, and that unfilled positions are never read."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from model.kernels.attention import SPLIT, decode_attention  # noqa: E402

HEADS, T, D = 2, 80, 16
TEST_SPLIT = 16  # small, so that T=80 spans five splits, the last one partial


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
    """Softmax attention of each row's query over its first lengths[r] positions, in float32."""
    scores = torch.einsum("rhd,rhtd->rht", q.float(), keys.float()) * q.shape[-1] ** -0.5
    unfilled = torch.arange(keys.shape[2])[None, :] >= lengths[:, None]
    weights = scores.masked_fill(unfilled[:, None, :], float("-inf")).softmax(-1)
    return torch.einsum("rht,rhtd->rhd", weights, values.float())


def inputs(lengths: list[int], seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    q = torch.randn(rows, HEADS, D, generator=generator).to(dtype)
    # A row prefix of a larger cache, as the batch decoder passes a page's `cache[:rows]`.
    cache = torch.randn(2, rows + 3, HEADS, T, D, generator=generator).to(dtype)
    return q, cache[0, :rows], cache[1, :rows], torch.tensor(lengths, dtype=torch.int64)


@pytest.mark.parametrize("split", [TEST_SPLIT, SPLIT])
def test_matches_torch(split: int) -> None:
    # 1, split boundaries (15/16/17, 64/65), and the whole cache.
    lengths = [1, 2, 15, 16, 17, 33, 64, 65, 79, T]
    q, keys, values, lengths_t = inputs(lengths, seed=0)
    out = decode_attention(q, keys, values, lengths_t, split=split)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, reference(q, keys, values, lengths_t), atol=1e-5, rtol=1e-5)


def test_float16_inputs_give_float16() -> None:
    q, keys, values, lengths = inputs([3, 40, T], seed=1, dtype=torch.float16)
    out = decode_attention(q, keys, values, lengths, split=TEST_SPLIT)
    assert out.dtype == torch.float16
    expected = reference(q, keys, values, lengths).half()
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


def test_row_is_batch_invariant() -> None:
    """A row's output is bit-identical alone, among rows of other lengths and contents, and at
    another index in a batch of another size."""
    q, keys, values, lengths = inputs([37], seed=2)
    alone = decode_attention(q, keys, values, lengths, split=TEST_SPLIT)
    for seed, others in ((3, [T, 1, 64, 5]), (4, [16, 17, 2, 80, 80, 9, 33])):
        oq, okeys, ovalues, olengths = inputs(others, seed=seed)
        at = len(others) // 2
        q_b = torch.cat([oq[:at], q, oq[at:]])
        keys_b = torch.cat([okeys[:at], keys, okeys[at:]])
        values_b = torch.cat([ovalues[:at], values, ovalues[at:]])
        lengths_b = torch.cat([olengths[:at], lengths, olengths[at:]])
        batch = decode_attention(q_b, keys_b, values_b, lengths_b, split=TEST_SPLIT)
        assert torch.equal(batch[at : at + 1], alone)
        # And the other rows are themselves unaffected by the inserted row.
        rest = torch.cat([batch[:at], batch[at + 1 :]])
        assert torch.equal(rest, decode_attention(oq, okeys, ovalues, olengths, split=TEST_SPLIT))


def test_positions_past_length_are_never_read() -> None:
    lengths_list = [1, 16, 17, 50, 65, T]
    q, keys, values, lengths = inputs(lengths_list, seed=5)
    clean = decode_attention(q, keys, values, lengths, split=TEST_SPLIT)
    keys, values = keys.clone(), values.clone()
    for row, length in enumerate(lengths_list):
        keys[row, :, length:] = float("nan")
        values[row, :, length:] = float("inf")
    dirty = decode_attention(q, keys, values, lengths, split=TEST_SPLIT)
    assert torch.isfinite(dirty).all()
    assert torch.equal(dirty, clean)
