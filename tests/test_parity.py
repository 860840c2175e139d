"""Our model against min-dalle 0.4.11 on the same weight files (min-dalle is the test oracle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model import MinDalle, ModelConfig
from model.weights.random_weights import write_random_weights
from tests.conftest import SMALL_CONFIG
from tests.reference import ReferenceRun, reference_model, run_reference

LONG_TEXT = " ".join(["a painting of a fox in the snow by claude monet"] * 12)
EMOJI_TEXT = "Ein Fuchs 🦊 im Schnee ❄️ — café, naïve, 東京, 123"


@pytest.fixture(scope="module")
def ours(small_models_root: Path) -> MinDalle:
    return MinDalle(small_models_root, device="cpu", is_mega=False, is_verbose=False)


@pytest.fixture(scope="module")
def reference(small_models_root: Path) -> Any:
    return reference_model(small_models_root, SMALL_CONFIG)


def to_image(grid: torch.Tensor) -> Image.Image:
    return Image.fromarray(grid.to(torch.uint8).cpu().numpy())


def assert_same_image(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size
    assert np.array_equal(np.asarray(a), np.asarray(b))


def our_run(model: MinDalle, **kwargs: Any) -> tuple[list[torch.Tensor], list[Image.Image]]:
    is_seamless = kwargs.pop("is_seamless", False)
    token_frames = list(model.generate_image_tokens_stream(**kwargs))
    frames = [to_image(model.detokenize(tokens, is_seamless)) for tokens in token_frames]
    return token_frames, frames


def assert_same_run(ours: MinDalle, reference: Any, **kwargs: Any) -> ReferenceRun:
    expected = run_reference(reference, **kwargs)
    token_frames, frames = our_run(ours, **kwargs)
    assert len(token_frames) == len(expected.image_tokens)
    for got, want in zip(token_frames, expected.image_tokens, strict=True):
        assert torch.equal(got, want)
    for got_image, want_image in zip(frames, expected.frames, strict=True):
        assert_same_image(got_image, want_image)
    return expected


@pytest.mark.parametrize(
    "text",
    [
        "a painting of a fox in the snow",
        "A Painting  of a FOX!",  # case and a double space
        EMOJI_TEXT,
        LONG_TEXT,
        "",
        "0123 unknown digits",
        "😀",
    ],
)
def test_tokenizer_matches_reference(ours: MinDalle, reference: Any, text: str) -> None:
    assert ours.tokenizer.tokenize(text) == reference.tokenizer.tokenize(text)


def test_encoder_state_and_text_rows_match_reference(ours: MinDalle, reference: Any) -> None:
    expected = run_reference(reference, text=LONG_TEXT, seed=1, grid_size=1, top_k=1)
    text_tokens = ours._text_tokens(LONG_TEXT)
    # Long text: both cut to 64 tokens, and the unconditioned row ends with the last kept token.
    assert torch.equal(text_tokens, expected.text_tokens)
    assert ours.encoder is not None
    with torch.inference_mode():
        state = ours.encoder(text_tokens)
    torch.testing.assert_close(state, expected.encoder_state, rtol=1e-5, atol=1e-5)


def test_decoder_logits_match_reference(ours: MinDalle, reference: Any) -> None:
    image_count, steps = 2, 24
    text_tokens = ours._text_tokens("a photo of a city street at night")
    generator = torch.Generator().manual_seed(0)
    prev_tokens = torch.randint(0, 2**14, (image_count, steps), generator=generator)
    prev_tokens[:, 0] = 2**14 - 1

    with torch.no_grad():
        encoder_state = reference.encoder(text_tokens)
        rows = [0] * image_count + [1] * image_count
        attention_state = torch.zeros(
            (SMALL_CONFIG.layer_count, 4 * image_count, 256, SMALL_CONFIG.embed_count)
        )
        expected = []
        for i in range(steps):
            logits, attention_state = reference.decoder(
                attention_mask=text_tokens[rows].ne(1)[:, None, None, :],
                encoder_state=encoder_state[rows],
                attention_state=attention_state,
                prev_tokens=prev_tokens[:, [i]],
                token_index=torch.arange(256)[[i]],
            )
            expected.append(logits[:, -1, : 2**14].clone())

    assert ours.decoder is not None
    with torch.inference_mode():
        context = ours.decoder.text_context(encoder_state, text_tokens)
        caches = ours.decoder.new_caches(2 * image_count, torch.float32, torch.device("cpu"))
        for i in range(steps):
            logits = ours.decoder(prev_tokens[:, i].repeat(2), i, caches, context, 2**14)
            torch.testing.assert_close(logits, expected[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "case",
    [
        dict(text="a painting of a fox in the snow", seed=3, grid_size=1),
        dict(text="an astronaut riding a horse", seed=4, grid_size=2),
        dict(text="a bowl of soup", seed=5, grid_size=2, is_seamless=True),
        dict(text=LONG_TEXT, seed=6, grid_size=1),
        dict(text=EMOJI_TEXT, seed=7, grid_size=1),
    ],
    ids=["grid1", "grid2", "seamless", "long-text", "emoji-non-ascii"],
)
def test_greedy_tokens_and_images_match_reference(
    ours: MinDalle, reference: Any, case: dict[str, Any]
) -> None:
    assert_same_run(ours, reference, top_k=1, **case)


def test_progressive_frames_match_reference(ours: MinDalle, reference: Any) -> None:
    expected = assert_same_run(
        ours, reference, text="sunset over the mountains", seed=8, grid_size=1, top_k=1,
        progressive_outputs=True,
    )  # fmt: skip
    assert len(expected.frames) == 8


def test_sampled_images_match_reference_for_the_same_seed(ours: MinDalle, reference: Any) -> None:
    settings = dict(top_k=256, temperature=1.0, supercondition_factor=16.0)
    expected = assert_same_run(
        ours, reference, text="a smiling cat with a red hat", seed=1234, grid_size=2, **settings
    )
    # The sampler is really sampling: another seed gives other tokens.
    other, _ = our_run(
        ours, text="a smiling cat with a red hat", seed=4321, grid_size=2, **settings
    )
    assert not torch.equal(other[-1], expected.image_tokens[-1])


def test_public_methods_match_reference(ours: MinDalle, reference: Any) -> None:
    kwargs = dict(text="an armchair in the shape of an avocado", seed=9, grid_size=2, top_k=1)
    with torch.no_grad():
        expected_grid = reference.generate_image(**kwargs)
        expected_images = reference.generate_images(**kwargs)
    assert_same_image(ours.generate_image(**kwargs), expected_grid)
    images = ours.generate_images(**kwargs)
    assert images.shape == (4, 256, 256, 3) and images.dtype == torch.float32
    assert torch.equal(images, expected_images)


def test_mini_size_float16_files_match_reference(tmp_path: Path) -> None:
    """Real Mini shapes, written as float16 .pt files like the published ones."""
    write_random_weights(tmp_path, ModelConfig.mini(), is_mega=False, seed=2)
    (tmp_path / "dalle_bart_mini" / "config.json").unlink()  # the Mini preset must apply by itself
    encoder_file = torch.load(tmp_path / "dalle_bart_mini" / "encoder.pt", weights_only=True)
    assert {tensor.dtype for tensor in encoder_file.values()} == {torch.float16}
    del encoder_file

    ours = MinDalle(tmp_path, device="cpu", is_mega=False, is_verbose=False)
    assert ours.config == ModelConfig.mini()
    kwargs = dict(text="a painting of a fox in the snow", seed=11, grid_size=1)
    our_tokens, our_frames = our_run(ours, **kwargs)
    del ours
    expected = run_reference(reference_model(tmp_path, ModelConfig.mini()), **kwargs)
    assert torch.equal(our_tokens[-1], expected.image_tokens[-1])
    assert_same_image(our_frames[-1], expected.frames[-1])
