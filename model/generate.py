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


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 256
    supercondition_factor: float = 16.0

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and self.temperature != float("inf")):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
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
