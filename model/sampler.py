"""The farm's sampler: supercondition, temperature, top-k and a counter-based draw, as tensor ops
over many rows at once, with each row's settings in tensors. Nothing here waits for the device
or branches on a tensor's values, so a CUDA graph captures it with the decoder's forward.

The draw is the Gumbel-max trick: the token is the argmax over the kept codes of
(logit − max) / temperature + g, with g = −log(−log u) for a uniform u. That draws code i with
probability ∝ exp((logit_i − max) / temperature), min-dalle's distribution. Here u is not taken
from a generator's stream but computed from a hash of (seed, image, position, code): a row's
noise depends on nothing else in the batch, a resumed job redraws exactly what it drew, and no
per-job generator or Python loop runs per step. A farm seed therefore gives other images than
min-dalle's `torch.multinomial` draws; `MinDalle` keeps min-dalle's sampler (model/generate.py).

Top-k keeps exactly k codes: the k largest logits, ties broken by the lower code. (min-dalle also
keeps codes tied with the k-th; ties between float logits are rare.) The k of every row is found
with one `torch.topk` of `width` ≥ every row's k: the codes are ranked by a unique int64 key
(the logit's order-preserving bits, then the code), so the first k of them do not depend on the
width, which depends on the other rows' k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.config import VQGAN_CODE_COUNT
from model.generate import LOGIT_LIMIT

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so that a 32-bit value times one fits in int64 without overflow
# (from the low-bias 32-bit hash family: xorshift, multiply, xorshift, multiply, xorshift).
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_CODE_BITS = (VQGAN_CODE_COUNT - 1).bit_length()  # 14: a code fits below the logit's bits


def mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash of each element of an int64 tensor holding values in [0, 2**32)."""
    for multiplier in _MULTIPLIERS:
        x = ((x ^ (x >> 16)) * multiplier) & _MASK32
    return x ^ (x >> 15)


def mix_int(x: int) -> int:
    """`mix` for one Python int (the same function, for keys computed on the host)."""
    for multiplier in _MULTIPLIERS:
        x = ((x ^ (x >> 16)) * multiplier) & _MASK32
    return x ^ (x >> 15)


def image_key(seed: int, image: int) -> int:
    """The 32-bit key of one image of a job: a hash of its seed (all 64 bits) and its index."""
    seed &= 2**64 - 1
    return mix_int(mix_int(mix_int(seed & _MASK32) ^ (seed >> 32)) ^ image)


def step_keys(image_keys: Tensor, positions: Tensor) -> Tensor:
    """(R,) keys of each image row's draw at its position."""
    return mix(image_keys ^ positions)


def gumbel(keys: Tensor, codes: Tensor) -> Tensor:
    """Gumbel noise for the given codes of each row: (R,) keys × (R, C) codes → (R, C) float32.

    u = (24 bits of a hash + 0.5) / 2**24 lies strictly inside (0, 1), so g is finite."""
    bits = mix(mix(keys[:, None] ^ codes)) >> 8
    u = (bits.float() + 0.5) * 2.0**-24
    return -torch.log(-torch.log(u))


def supercondition(logits: Tensor, factor: Tensor, images: int) -> Tensor:
    """(slots · 2N, V) logits, each slot's N unconditioned rows then its N conditioned ones, and
    (slots · N, 1) factors → (slots · N, V) guided float32 logits.

    ±inf logits (an overflow in the model) are clamped to ±LOGIT_LIMIT, which is their meaning
    (always, or never drawn), so that mixing them with a factor in the farm's range stays finite;
    NaN stays NaN (see `draw`)."""
    bounded = logits.float().clamp(-LOGIT_LIMIT, LOGIT_LIMIT).view(-1, 2, images, logits.shape[1])
    factor = factor.view(-1, images, 1)
    guided = bounded[:, 0] * (1 - factor) + bounded[:, 1] * factor
    return guided.view(-1, logits.shape[1])


def width_for(top_k: int) -> int:
    """The topk width for rows whose largest k is `top_k`: the next power of two (fewer
    distinct widths, hence fewer CUDA graphs)."""
    return min(VQGAN_CODE_COUNT, 1 << max(0, top_k - 1).bit_length())


def draw(
    guided: Tensor, temperature: Tensor, top_k: Tensor, keys: Tensor, width: int
) -> tuple[Tensor, Tensor]:
    """One token per row: (R, V) float32 guided logits, (R, 1) temperatures, (R,) top_k,
    (R,) step keys, and a width ≥ every row's top_k → ((R,) int64 tokens, (R,) is_nan).

    A row whose logits hold NaN cannot be sampled: `is_nan` marks it, and its token is some
    code (any: the caller fails the job)."""
    is_nan = guided.isnan().any(dim=-1)
    # Order-preserving integer bits of each float32 (negative floats count down), then the code,
    # lowest first among equal logits: a unique int64 key per code.
    bits = guided.view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    codes = torch.arange(guided.shape[1], device=guided.device)
    ranked = torch.topk((bits << _CODE_BITS) | (VQGAN_CODE_COUNT - 1 - codes), width).values
    candidates = VQGAN_CODE_COUNT - 1 - (ranked & (VQGAN_CODE_COUNT - 1))  # (R, width)
    logits = guided.gather(1, candidates)
    scores = (logits - logits[:, :1]) / temperature + gumbel(keys, candidates)
    is_kept = torch.arange(width, device=guided.device) < top_k[:, None]
    choice = scores.masked_fill(~is_kept, float("-inf")).argmax(dim=-1, keepdim=True)
    return candidates.gather(1, choice)[:, 0], is_nan
