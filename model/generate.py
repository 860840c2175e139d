"""Image-token generation as small named steps: encode → text context → decode 256 tokens.

Sampling is min-dalle's "supercondition" classifier-free guidance: every image has an
unconditioned row (the prompt reduced to <s> and its last token) and a conditioned row, and the
logits are mixed as uncond·(1 − f) + cond·f before top-k sampling with a temperature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from model.bart import DalleBartDecoder, KVCache, TextContext
from model.config import IMAGE_TOKEN_COUNT, VQGAN_CODE_COUNT

# The decoder's first input. min-dalle feeds 2**14 - 1 (not dalle-mini's 16384); we keep its value
# because it changes every image.
START_TOKEN = VQGAN_CODE_COUNT - 1
# With progressive outputs, a frame is produced after every this many tokens (8 frames in all).
FRAME_INTERVAL = 32

StepCallback = Callable[[int, int], None]

# The smallest temperature sampling can divide by: float32's smallest normal number, 2**-126
# (1.1754943508222875e-38). Below it the temperature is a subnormal float32, which a device that
# flushes subnormals to zero (or computes x / t as x · (1 / t), where 1 / t overflows) turns
# into 0 / 0 = NaN for the top logit; below about 1.4e-45 it rounds to 0 on every device. Any
# temperature from here down to 0 samples the same as this one: greedily (ties drawn at random).
MIN_TEMPERATURE = 2.0**-126
# The supercondition factors the farm's sampler accepts (BatchDecoder). Its logits are clamped
# to ±LOGIT_LIMIT so that mixing them with any factor in this range stays finite in float32.
SUPERCONDITION_FACTOR_RANGE = (0.0, 128.0)
# |uncond · (1 − f)| + |cond · f| <= LOGIT_LIMIT · 255 < float32's largest number, for f in the
# range above. Real logits are a few tens; only an overflow in the model reaches the limit.
LOGIT_LIMIT = float(torch.finfo(torch.float32).max) / 256


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 256
    supercondition_factor: float = 16.0

    def __post_init__(self) -> None:
        if not (MIN_TEMPERATURE <= self.temperature < float("inf")):
            raise ValueError(
                f"temperature must be a finite number of at least {MIN_TEMPERATURE!r} "
                f"(2**-126; lower ones sample the same, greedily), got {self.temperature}"
            )
        if not 1 <= self.top_k <= VQGAN_CODE_COUNT:
            raise ValueError(f"top_k must be between 1 and {VQGAN_CODE_COUNT}, got {self.top_k}")
        if self.supercondition_factor != self.supercondition_factor or abs(
            self.supercondition_factor
        ) == float("inf"):
            raise ValueError(
                f"supercondition_factor must be finite, got {self.supercondition_factor}"
            )


def supercondition(logits: Tensor, factor: Tensor) -> Tensor:
    """(2N, V) logits, unconditioned rows first → (N, V) guided logits."""
    image_count = logits.shape[0] // 2
    return logits[:image_count] * (1 - factor) + logits[image_count:] * factor


def logits_to_probs(logits: Tensor, temperature: Tensor, top_k: int) -> Tensor:
    """Unnormalised probabilities over the top_k codes (ties with the k-th are kept too)."""
    top = torch.topk(logits, top_k, dim=-1).values  # sorted, largest first
    is_kept = logits >= top[:, -1:]
    probs = torch.exp((logits - top[:, :1]) / temperature)
    return probs * is_kept.to(probs.dtype)


def check_guided_settings(settings: SamplingSettings) -> None:
    """Raise ValueError unless `guided_probs` can compute these settings (the farm's range)."""
    low, high = SUPERCONDITION_FACTOR_RANGE
    if not low <= settings.supercondition_factor <= high:
        raise ValueError(
            f"supercondition_factor must be between {low:g} and {high:g}, "
            f"got {settings.supercondition_factor}"
        )


def guided_probs(
    logits: Tensor, factor: Tensor, temperature: Tensor, top_k: int
) -> tuple[Tensor, Tensor]:
    """The farm's sampling distribution: (2N, V) logits → ((N, V) probs, (N,) is_nan).

    The same arithmetic as supercondition → logits_to_probs, in float32, made total for the
    settings `check_guided_settings` and SamplingSettings accept: ±inf logits (an overflow in
    the model) are clamped to ±LOGIT_LIMIT, which is their meaning (always, or never drawn), and
    the result never holds inf. A row whose logits hold NaN cannot be sampled: `is_nan` marks
    it, and its probabilities are made uniform so that the draw still runs (a NaN reaching
    torch.multinomial is a device-side assert on CUDA, fatal to every job on the device).
    """
    bounded = logits.float().clamp(-LOGIT_LIMIT, LOGIT_LIMIT)  # NaN stays NaN
    probs = logits_to_probs(supercondition(bounded, factor), temperature, top_k)
    is_nan = probs.isnan().any(dim=-1)
    return probs.nan_to_num_(nan=1.0), is_nan


def sample(probs: Tensor, generator: torch.Generator) -> Tensor:
    # One multinomial draw over the full vocabulary per row: this consumes the random stream
    # exactly as min-dalle does, so a seed gives min-dalle's images.
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def decode_one_token(
    decoder: DalleBartDecoder,
    prev_tokens: Tensor,
    position: int,
    caches: list[KVCache],
    text: TextContext,
    temperature: Tensor,
    top_k: int,
    factor: Tensor,
    generator: torch.Generator,
) -> Tensor:
    logits = decoder(prev_tokens, position, caches, text, VQGAN_CODE_COUNT).float()
    probs = logits_to_probs(supercondition(logits, factor), temperature, top_k)
    return sample(probs, generator)


@torch.inference_mode()
def decode_image_tokens(
    decoder: DalleBartDecoder,
    text: TextContext,
    image_count: int,
    settings: SamplingSettings,
    generator: torch.Generator,
    progressive_outputs: bool = False,
    on_step: StepCallback | None = None,
) -> Iterator[Tensor]:
    """Generate (N, 256) image tokens. Yields every FRAME_INTERVAL tokens with progressive
    outputs (positions not generated yet hold START_TOKEN, as in min-dalle), else once at the end.
    """
    device = text.attention_mask.device
    dtype = text.keys[0].dtype
    # Sampling settings as 1-element float32 tensors, the same arithmetic min-dalle does.
    temperature = torch.tensor([settings.temperature], dtype=torch.float32, device=device)
    factor = torch.tensor([settings.supercondition_factor], dtype=torch.float32, device=device)

    caches = decoder.new_caches(2 * image_count, dtype, device)
    image_tokens = torch.full(
        (image_count, IMAGE_TOKEN_COUNT), START_TOKEN, dtype=torch.long, device=device
    )
    prev_tokens = torch.full((2 * image_count,), START_TOKEN, dtype=torch.long, device=device)
    for position in range(IMAGE_TOKEN_COUNT):
        tokens = decode_one_token(
            decoder,
            prev_tokens,
            position,
            caches,
            text,
            temperature,
            settings.top_k,
            factor,
            generator,
        )
        image_tokens[:, position] = tokens
        prev_tokens = tokens.repeat(2)  # both rows of an image continue from the same token
        if on_step is not None:
            on_step(position + 1, IMAGE_TOKEN_COUNT)
        step = position + 1
        if step == IMAGE_TOKEN_COUNT or (progressive_outputs and step % FRAME_INTERVAL == 0):
            yield image_tokens.clone()
