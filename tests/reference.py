"""min-dalle 0.4.11, the reference implementation, set up as a test oracle on our weight files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from model.config import ModelConfig


def reference_model(
    models_root: Path,
    config: ModelConfig,
    is_mega: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Any:
    """A min_dalle.MinDalle built with `config`'s sizes instead of its hard-coded ones."""
    import min_dalle.min_dalle as reference

    # Importing min_dalle turns autograd off for the whole process; turn it back on so that our
    # own code is tested as users run it, and run the reference under no_grad instead.
    torch.set_grad_enabled(True)
    # min-dalle pings its (now gone) hub repository on every construction; no network here.
    reference.requests.get = _offline_get
    with torch.no_grad():
        model = reference.MinDalle(
            models_root=str(models_root),
            dtype=dtype,
            device=device,
            is_mega=is_mega,
            is_reusable=False,  # only the tokenizer: the sizes are set below
            is_verbose=False,
        )
        for field in (
            "layer_count",
            "attention_head_count",
            "embed_count",
            "glu_embed_count",
            "text_vocab_count",
            "image_vocab_count",
            "text_token_count",
        ):
            setattr(model, field, getattr(config, field))
        model.is_reusable = True
        model.init_encoder()
        model.init_decoder()
        model.init_detokenizer()
    return model


def _offline_get(url: str, *args: Any, **kwargs: Any) -> None:
    if not url.endswith("config.json"):
        raise AssertionError(f"min-dalle tried to download {url}")


@dataclass
class ReferenceRun:
    text_tokens: torch.Tensor  # (2, 64) the encoder's input rows
    encoder_state: torch.Tensor  # (2, 64, E)
    image_tokens: list[torch.Tensor]  # (N, 256) behind each frame
    frames: list[Image.Image]


def run_reference(model: Any, **kwargs: Any) -> ReferenceRun:
    """Run the reference's generate_image_stream, recording what went in and out of its stages."""
    seen: dict[str, torch.Tensor] = {}
    token_frames: list[torch.Tensor] = []
    encode, detokenize = model.encoder.forward, model.image_grid_from_tokens

    def encoder_spy(text_tokens: torch.Tensor) -> torch.Tensor:
        seen["text_tokens"] = text_tokens.clone()
        seen["encoder_state"] = encode(text_tokens).clone()
        return seen["encoder_state"]

    def detokenize_spy(image_tokens: torch.Tensor, **spy_kwargs: Any) -> torch.Tensor:
        token_frames.append(image_tokens.clone())
        return detokenize(image_tokens=image_tokens, **spy_kwargs)

    model.encoder.forward, model.image_grid_from_tokens = encoder_spy, detokenize_spy
    try:
        with torch.no_grad():
            frames = list(model.generate_image_stream(**kwargs))
    finally:
        del model.encoder.forward, model.image_grid_from_tokens
    return ReferenceRun(seen["text_tokens"], seen["encoder_state"], token_frames, frames)
