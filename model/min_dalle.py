"""MinDalle: min-dalle 0.4.11's Python surface over our faster model.

Same constructor arguments, method names, defaults and return types, and the same images for
the same seed and settings. Extras: `config` (model sizes), `on_step` (progress, cancellation),
the VQGAN's opt-in precision and memory format, and `detokenize_many` (many grids' VQGAN at once).
"""

from __future__ import annotations

import copy
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
from model.vqgan import (
    PIXELS_PER_SIDE,
    TOKENS_PER_SIDE,
    VQGanDetokenizer,
    assemble_grid,
    code_maps,
    exact_on_cpu,
    grid_side,
    plan_batches,
)
from model.weights import fetch, manifest
from model.weights.files import Stage, WeightPaths, load_module

logger = logging.getLogger(__name__)

# "float32" is min-dalle's VQGAN, bit for bit. "bfloat16" runs a bfloat16 copy of its weights
# on bfloat16 activations: faster on GPUs, but pixels change slightly (tests/test_vqgan.py
# bounds by how much). No "tf32": on CUDA it is a process-global torch flag, which one model
# cannot flip while other threads run other work.
VQGAN_PRECISIONS = ("float32", "bfloat16")


def _fill_count(maps: int, map_side: int, max_images: int) -> int:
    """Zero maps that bring a batch of `maps` maps of map_side codes a side to max_images
    256×256 images' worth; none for a grid that is a batch of its own beyond that."""
    per_map = (map_side // TOKENS_PER_SIDE) ** 2  # 256×256 images per map (more if seamless)
    full = max(1, max_images // per_map)
    return full - maps if maps < full else 0


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
        *,
        vqgan_precision: str = "float32",
        vqgan_channels_last: bool = False,
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
        # channels_last only on CUDA: on the CPU it changed pixels (BENCHMARKS.md).
        self.vqgan_channels_last = vqgan_channels_last and self.device.type == "cuda"
        self._vqgan_bf16: VQGanDetokenizer | None = None
        self.set_vqgan_precision(vqgan_precision)
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
        # Loaded in float32, as in min-dalle, whatever `dtype` is: its output is the image
        # itself. vqgan_precision may add a bfloat16 copy (vqgan()).
        detokenizer = load_module(VQGanDetokenizer, path, self.device, torch.float32)
        if self.vqgan_channels_last:
            detokenizer.use_channels_last()
        return detokenizer

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

    # -- the VQGAN ---------------------------------------------------------------------------

    def set_vqgan_precision(self, precision: str) -> None:
        """Run the VQGAN in "float32" (the default: min-dalle's pixels) or "bfloat16" (faster on
        a GPU; pixels change slightly, by a few uint8 levels). Takes effect at the next decode."""
        if precision not in VQGAN_PRECISIONS:
            choices = ", ".join(VQGAN_PRECISIONS)
            raise ValueError(f"unknown VQGAN precision {precision!r}; choose one of {choices}")
        self.vqgan_precision = precision
        self._vqgan_bf16 = None

    def vqgan(self) -> VQGanDetokenizer:
        """The detokenizer for vqgan_precision; the float32 weights stay as they were loaded."""
        detokenizer = self.detokenizer or self._load_detokenizer()
        if not self.is_reusable:
            self.detokenizer = detokenizer  # kept until the stream ends (progressive frames)
        if self.vqgan_precision == "float32":
            return detokenizer
        if self._vqgan_bf16 is None:
            self._vqgan_bf16 = copy.deepcopy(detokenizer).to(torch.bfloat16)
        return self._vqgan_bf16

    def detokenize(self, image_tokens: Tensor, is_seamless: bool = False) -> Tensor:
        """(N, 256) tokens of a square grid → (S, S, 3) float pixels in [0, 255]."""
        detokenizer = self.vqgan()
        with torch.inference_mode():
            return detokenizer(image_tokens.to(self.device), is_seamless)

    def detokenize_many(
        self,
        grids: list[Tensor],
        is_seamless: bool = False,
        max_images: int = 64,
        *,
        pad: bool = False,
    ) -> list[Tensor]:
        """detokenize(grid, is_seamless) for each grid, decoding images of several grids at once.

        Grids may differ in size. One call is either seamless or not (a seamless grid is a
        single joined map, so only seamless grids of one size share a batch). A batch holds
        whole grids, up to max_images 256×256 images' worth (one larger grid goes alone).

        On the CPU every grid's pixels are exactly detokenize's: batches respect the limits in
        model.vqgan.plan_batches, and at a thread count that is not a power of two
        (exact_on_cpu) each grid is decoded alone. On CUDA cuDNN picks its kernels per shape,
        so `pad` fills every batch of grids that fit to exactly max_images maps (zero codes,
        decoded and dropped): all such batches then have one shape, and an image's pixels do
        not depend on how many images shared its batch (worker/vqgan_batches.py checks that
        they do not depend on the neighbours either, at startup).
        """
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images!r}")
        sides = [grid_side(grid) for grid in grids]
        detokenizer = self.vqgan()
        results: list[Tensor | None] = [None] * len(grids)
        with torch.inference_mode():
            for batch in self._vqgan_batches(sides, is_seamless, max_images):
                maps = [code_maps(grids[i].to(self.device), is_seamless) for i in batch]
                joined = torch.cat(maps)
                fill = _fill_count(len(joined), joined.shape[1], max_images) if pad else 0
                if fill:
                    joined = torch.cat([joined, joined.new_zeros(fill, *joined.shape[1:])])
                pixels = detokenizer.decode(joined)[: len(joined) - fill]
                for i, grid_pixels in zip(batch, pixels.split([len(m) for m in maps]), strict=True):
                    results[i] = assemble_grid(grid_pixels, sides[i], is_seamless)
        return [grid for grid in results if grid is not None]

    def _vqgan_batches(
        self, sides: list[int], is_seamless: bool, max_images: int
    ) -> list[list[int]]:
        """Indices of the grids that share each decoder batch."""
        exact = self.device.type == "cpu"
        if exact and not exact_on_cpu(torch.get_num_threads()):
            return [[i] for i in range(len(sides))]
        if not is_seamless:
            return plan_batches([side**2 for side in sides], max_images, exact)
        batches = []
        for side in sorted(set(sides)):  # joined maps of one size per batch
            same = [i for i, other in enumerate(sides) if other == side]
            plan = plan_batches([1] * len(same), max(1, max_images // side**2), exact)
            batches += [[same[j] for j in batch] for batch in plan]
        return batches

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
            self._release("detokenizer", "_vqgan_bf16")

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
