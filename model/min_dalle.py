"""MinDalle: min-dalle 0.4.11's Python surface over our faster model.

Same constructor arguments, method names, defaults and return types, and the same images for
the same seed and settings. Extras: `config` (model sizes) and `on_step` (progress, cancellation).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from model.bart import DalleBartDecoder, DalleBartEncoder, TextContext
from model.config import ModelConfig
from model.errors import ModelError
from model.generate import SamplingSettings, StepCallback, decode_image_tokens
from model.tokenizer import TextTokenizer, text_tokens
from model.vqgan import PIXELS_PER_SIDE, VQGanDetokenizer
from model.weights import fetch, manifest
from model.weights.files import Stage, WeightPaths, load_module

logger = logging.getLogger(__name__)


def resolve_config(paths: WeightPaths, config: ModelConfig | None) -> ModelConfig:
    """An explicit config wins; then config.json beside the weights; then the mini/mega preset."""
    if config is not None:
        return config
    preset = ModelConfig.preset(paths.is_mega)
    if paths.config.exists():
        return ModelConfig.from_json(paths.config, preset)
    return preset


class MinDalle:
    def __init__(
        self,
        models_root: str | Path = "pretrained",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        is_mega: bool = True,
        is_reusable: bool = True,
        is_verbose: bool = True,
        config: ModelConfig | None = None,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device {device!r} was asked for, but torch finds no CUDA GPU")
        self.dtype = dtype
        self.is_mega = is_mega
        self.is_reusable = is_reusable
        self.is_verbose = is_verbose
        self.paths = WeightPaths(Path(models_root), is_mega)
        self._log("using device %s", self.device)

        if not (self.paths.vocab.is_file() and self.paths.merges.is_file()):
            self._fetch_missing()
        manifest.check_sizes([self.paths.vocab, self.paths.merges])
        self.config = resolve_config(self.paths, config)
        self.tokenizer = TextTokenizer.from_files(self.paths.vocab, self.paths.merges)

        self.encoder: DalleBartEncoder | None = None
        self.decoder: DalleBartDecoder | None = None
        self.detokenizer: VQGanDetokenizer | None = None
        if is_reusable:
            self.encoder = self._load_encoder()
            self.decoder = self._load_decoder()
            self.detokenizer = self._load_detokenizer()

    # -- loading ----------------------------------------------------------------------------

    def _log(self, message: str, *args: Any) -> None:
        logger.log(logging.INFO if self.is_verbose else logging.DEBUG, message, *args)

    def _fetch_missing(self) -> None:
        # By default the original checkpoints, converted once; see model.weights.fetch.
        fetch.ensure_weights(self.paths, show_progress=self.is_verbose)

    def _stage_file(self, stage: Stage) -> Path:
        """The file a stage loads, fetched first if missing, and checked against the manifest."""
        if not self.paths.has_stage(stage):
            self._fetch_missing()
        path = self.paths.stage_file(stage)
        manifest.check_sizes([path])
        return path

    def _load_encoder(self) -> DalleBartEncoder:
        path = self._stage_file("encoder")
        self._log("initializing DalleBartEncoder")
        return load_module(lambda: DalleBartEncoder(self.config), path, self.device, self.dtype)

    def _load_decoder(self) -> DalleBartDecoder:
        path = self._stage_file("decoder")
        self._log("initializing DalleBartDecoder")
        return load_module(lambda: DalleBartDecoder(self.config), path, self.device, self.dtype)

    def _load_detokenizer(self) -> VQGanDetokenizer:
        path = self._stage_file("detoker")
        self._log("initializing VQGanDetokenizer")
        # Always float32, as in min-dalle: the VQGAN is a small part of the time, and its output
        # is the image itself.
        return load_module(VQGanDetokenizer, path, self.device, torch.float32)

    def _release(self, *names: str) -> None:
        """With is_reusable=False, free stages after use so only one is resident at a time."""
        if self.is_reusable:
            return
        for name in names:
            setattr(self, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- generation -------------------------------------------------------------------------

    def _text_tokens(self, text: str) -> Tensor:
        tokens = self.tokenizer.tokenize(text)
        self._log("%d text tokens %s", len(tokens), tokens)
        rows = text_tokens(tokens, self.config.text_token_count)
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _text_context(self, text: str) -> TextContext:
        tokens = self._text_tokens(text)
        encoder = self.encoder or self._load_encoder()
        with torch.inference_mode():
            encoder_state = encoder(tokens)
        del encoder
        self._release("encoder")
        self.decoder = self.decoder or self._load_decoder()
        with torch.inference_mode():
            return self.decoder.text_context(encoder_state, tokens)

    def _generator(self, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        # A seed <= 0 means random, as in min-dalle.
        generator.manual_seed(seed if seed > 0 else secrets.randbits(63))
        return generator

    def generate_image_tokens_stream(
        self,
        text: str,
        seed: int,
        grid_size: int,
        progressive_outputs: bool = False,
        temperature: float = 1,
        top_k: int = 256,
        supercondition_factor: float = 16,
        is_verbose: bool = False,
        on_step: StepCallback | None = None,
    ) -> Generator[Tensor, None, None]:
        """(grid_size², 256) image tokens: every 32 tokens with progressive_outputs, else once."""
        if not isinstance(grid_size, int) or grid_size < 1:
            raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
        settings = SamplingSettings(float(temperature), int(top_k), float(supercondition_factor))
        text_context = self._text_context(text)
        assert self.decoder is not None
        generator = self._generator(seed)
        if is_verbose:
            logger.info("sampling %d images", grid_size**2)
        try:
            yield from decode_image_tokens(
                self.decoder,
                text_context,
                grid_size**2,
                settings,
                generator,
                progressive_outputs=progressive_outputs,
                on_step=on_step,
            )
        finally:
            self._release("decoder")

    def detokenize(self, image_tokens: Tensor, is_seamless: bool = False) -> Tensor:
        """(N, 256) tokens of a square grid → (S, S, 3) float pixels in [0, 255]."""
        detokenizer = self.detokenizer or self._load_detokenizer()
        if not self.is_reusable:
            self.detokenizer = detokenizer  # kept until the stream ends (progressive frames)
        with torch.inference_mode():
            return detokenizer(image_tokens.to(self.device), is_seamless)

    def generate_raw_image_stream(
        self,
        text: str,
        seed: int,
        grid_size: int,
        progressive_outputs: bool = False,
        is_seamless: bool = False,
        temperature: float = 1,
        top_k: int = 256,
        supercondition_factor: float = 16,
        is_verbose: bool = False,
        on_step: StepCallback | None = None,
    ) -> Iterator[Tensor]:
        """The grid as a (grid·256, grid·256, 3) float tensor, per frame."""
        tokens_stream = self.generate_image_tokens_stream(
            text, seed, grid_size, progressive_outputs, temperature, top_k,
            supercondition_factor, is_verbose, on_step,
        )  # fmt: skip
        try:
            for image_tokens in tokens_stream:
                yield self.detokenize(image_tokens, is_seamless)
        finally:
            tokens_stream.close()
            self._release("detokenizer")

    def generate_image_stream(self, *args: Any, **kwargs: Any) -> Iterator[Image.Image]:
        for grid in self.generate_raw_image_stream(*args, **kwargs):
            yield Image.fromarray(grid.to(torch.uint8).cpu().numpy())

    def generate_images_stream(self, *args: Any, **kwargs: Any) -> Iterator[Tensor]:
        """(grid_size², 256, 256, 3) float tensors, images in generation order."""
        for grid in self.generate_raw_image_stream(*args, **kwargs):
            grid_size = grid.shape[0] // PIXELS_PER_SIDE
            # Undo the grid layout (image a·grid + b sits at tile row b, tile column a).
            images = grid.view(grid_size, PIXELS_PER_SIDE, grid_size, PIXELS_PER_SIDE, 3)
            yield images.permute(2, 0, 1, 3, 4).reshape(
                grid_size**2, PIXELS_PER_SIDE, PIXELS_PER_SIDE, 3
            )

    def generate_image(self, *args: Any, **kwargs: Any) -> Image.Image:
        return next(self.generate_image_stream(*args, **kwargs, progressive_outputs=False))

    def generate_images(self, *args: Any, **kwargs: Any) -> Tensor:
        return next(self.generate_images_stream(*args, **kwargs, progressive_outputs=False))
