"""The model a worker keeps resident, and the PNGs it renders for a job.

`Engine.load(settings)` builds MinDalle once per process (device and dtype resolved from
Settings) and starts its batching engine (worker/batching.py); `Engine.render(params)`, called
from any number of job threads at once, turns JobParams into PNG bytes:

- the grid, as one image;
- one tile per image, in row-major tile order (the order of the tile files `{i}.png`);
- with progressive_outputs, a preview grid per intermediate decoder frame, handed to a callback
  as soon as it exists.

Once a job's tokens are done, its thread runs the VQGAN, sharing the decode with other jobs
that finish at the same time (worker/vqgan_batches.py, DALLE_FARM_VQGAN_BATCH_IMAGES), in the
DALLE_FARM_VQGAN_MODE precision; then the grid and tiles are encoded on the process's PNG pool
(worker/finishing.py), at zlib level DALLE_FARM_PNG_COMPRESSION. Previews stay on the job's
thread. `Rendered.timings` says how long each part took.

The engine's `weights` is model.weights.manifest.weights_identity: every file the model loads,
hashed again when the worker starts and checked against the manifest beside it, for job.json.

torch is imported here; the API never imports this module.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from core.job import JobParams
from core.settings import Settings
from model.config import IMAGE_TOKEN_COUNT
from model.generate import START_TOKEN, SamplingSettings
from model.min_dalle import MinDalle
from model.vqgan import PIXELS_PER_SIDE
from model.weights.files import WeightPaths
from model.weights.manifest import weights_identity
from worker.batching import CHECKPOINT_EVERY, BatchEngine, CheckpointCallback
from worker.finishing import BoundedPool, png_pool
from worker.vqgan_batches import VQGanBatches, batch_images

log = logging.getLogger(__name__)

# However much memory there is, a batch beyond this many rows only makes each step slower.
MAX_BATCH_ROWS = 4096

StepCallback = Callable[[int, int], None]
# (frame number from 1, PNG bytes of the whole grid at that frame)
PreviewCallback = Callable[[int, bytes], None]


@dataclass(frozen=True)
class Rendered:
    """A finished job's images as PNG bytes."""

    grid_png: bytes
    tile_pngs: list[bytes]  # row-major: tile_pngs[i] is the tile file `{i}.png`
    # Seconds per part: "decode_s" (the decoder, waits for a batch slot included), "vqgan_s",
    # "png_s".
    timings: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """`auto` → the first CUDA GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 on a GPU (half the memory, same speed class), float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype), name
    return dtype


def png_bytes(pixels: torch.Tensor, compression: int = 6) -> bytes:
    """(H, W, 3) float pixels in [0, 255] → PNG bytes (truncated to uint8, as min-dalle does).

    `compression` is zlib's level, 0 to 9; 6 is Pillow's default (DALLE_FARM_PNG_COMPRESSION).
    """
    image = Image.fromarray(pixels.to(torch.uint8).cpu().numpy())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compression)
    return buffer.getvalue()


def grid_tiles(grid: torch.Tensor, grid_size: int) -> list[torch.Tensor]:
    """The tiles of a (g·256, g·256, 3) grid, row-major: tile i is at row i // g, column i % g."""
    side = PIXELS_PER_SIDE
    return [
        grid[row * side : (row + 1) * side, col * side : (col + 1) * side]
        for row in range(grid_size)
        for col in range(grid_size)
    ]


class Engine:
    """A resident MinDalle, its batching engine, and the identity of its weights.

    Build it with `Engine.load`. `render` may be called from many threads at once: their jobs
    decode together (worker/batching.py).
    """

    def __init__(
        self,
        model: MinDalle,
        weights: dict[str, Any],
        max_rows: int,
        *,
        png_compression: int = 6,
        png_pool: BoundedPool | None = None,
        vqgan_batch_images: int = 1,
    ) -> None:
        self.model = model
        self.weights = weights
        self.batch = BatchEngine(model, max_rows)
        self.png_compression = png_compression
        self.png_pool = png_pool  # None: each job's thread encodes its own PNGs
        self.vqgan = VQGanBatches(model, vqgan_batch_images)
        self.ready_s: dict[str, float] = {}  # how long Engine.load took, by part

    @property
    def model_name(self) -> str:
        return "mega" if self.model.is_mega else "mini"

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Load the model `settings` names (DALLE_FARM_MODEL, _MODELS_ROOT, _DEVICE, _DTYPE).

        Raises model.errors.ModelError when the weights are missing or unusable.

        Everything slow happens here, before the worker takes a job, and the log says how long
        it took ("ready in"): the weights are memory-mapped and copied straight to the device
        (model.weights.files.load_module) while other threads hash them for job.json; on CUDA
        the decoder's self-check compiles its kernels and runs them in CUDA graphs, and the
        VQGAN's check runs its kernels once. The batch's own CUDA graphs are captured as each
        arrangement of jobs in it first appears (model/batch_forward.py logs each capture).
        """
        started = time.perf_counter()
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        is_mega = settings.model == "mega"
        log.info(
            "loading DALL·E %s from %s on %s (%s)",
            settings.model,
            settings.models_root,
            device,
            str(dtype).removeprefix("torch."),
        )
        fast_vqgan = settings.vqgan_mode != "float32" and device.type == "cuda"
        if fast_vqgan:
            # Process-wide, and this process is the worker's: only the VQGAN has convolutions.
            torch.backends.cudnn.benchmark = True
        hashing = ThreadPoolExecutor(1, thread_name_prefix="weights-hash")
        # Re-hashed at every start and checked against the manifest, if the weights have one:
        # job.json then names the bytes that rendered, not what a manifest once said. Nothing
        # is written into the (possibly shared) models folder.
        identity = hashing.submit(
            weights_identity, WeightPaths(settings.models_root, is_mega), verify=True
        )
        hashing.shutdown(wait=False)
        model = MinDalle(
            models_root=settings.models_root,
            dtype=dtype,
            device=device,
            is_mega=is_mega,
            is_reusable=True,
            is_verbose=False,
            vqgan_precision="bfloat16" if settings.vqgan_mode == "bfloat16" else "float32",
            vqgan_channels_last=fast_vqgan,
        )
        model.vqgan()  # its bfloat16 copy, if any, made now rather than by a job
        weights = identity.result()
        loaded = time.perf_counter()
        max_rows = settings.batch_rows or batch_rows_for_memory(model)
        log.info("batch: up to %d decoder rows (%d images)", max_rows, max_rows // 2)
        engine = cls(
            model,
            weights,
            max_rows,
            png_compression=settings.png_compression,
            png_pool=png_pool(settings),
            vqgan_batch_images=batch_images(settings.vqgan_batch_images, device),
        )
        if device.type == "cuda":
            engine.vqgan.check()
        log.info(
            "VQGAN: %s, up to %d images of several jobs at once",
            settings.vqgan_mode,
            engine.vqgan.max_images,
        )
        ready = time.perf_counter()
        engine.ready_s = {"load_s": loaded - started, "warm_up_s": ready - loaded}
        log.info(
            "ready in %.1f s (weights loaded and hashed %.1f s, warm-up %.1f s)",
            ready - started,
            loaded - started,
            ready - loaded,
        )
        return engine

    def close(self) -> None:
        self.batch.close()

    def render(
        self,
        params: JobParams,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
        *,
        job_id: str | None = None,
        resume: list[list[int]] | None = None,
        on_checkpoint: CheckpointCallback | None = None,
    ) -> Rendered:
        """Generate the job's images, decoding among the other jobs in flight.

        `on_step(step, 256)` runs in this thread as the decoder advances; an exception it raises
        drops the job at the next step and propagates. `on_preview(frame, png)` gets the grid
        every 32 tokens when params.progressive_outputs is set; `on_checkpoint(step, tokens)`
        gets the tokens so far every 32 tokens, and `resume` (such tokens) continues from them:
        the images equal an uninterrupted run's.

        Raises ValueError for parameters the model refuses, and model.batch.JobFailed (a
        ValueError) when this job's decoding failed (NaN logits): either way the other jobs in
        flight go on, with the images they would have had without it.
        """
        if params.model != self.model_name:
            raise ValueError(
                f"this worker serves DALL·E {self.model_name}, but the job asks for {params.model}"
            )
        previews = on_preview if params.progressive_outputs else None

        def on_snapshot(step: int, tokens: torch.Tensor) -> None:
            if on_checkpoint is not None:
                on_checkpoint(step, tokens.tolist())
            if previews is not None:
                partial = torch.full(
                    (tokens.shape[0], IMAGE_TOKEN_COUNT), START_TOKEN, device=tokens.device
                )
                partial[:, :step] = tokens
                frame = self.model.detokenize(partial, params.is_seamless)
                previews(step // CHECKPOINT_EVERY, png_bytes(frame))

        started = time.perf_counter()
        tokens = self.batch.decode(
            job_id or f"anonymous-{uuid.uuid4().hex}",
            params.text,
            params.seed,
            params.grid_size,
            SamplingSettings(
                float(params.temperature), int(params.top_k), float(params.supercondition_factor)
            ),
            resume=resume,
            on_step=on_step,
            on_snapshot=on_snapshot if on_checkpoint or previews else None,
        )
        decoded = time.perf_counter()
        # One copy to the host, as the bytes the PNGs hold; the tiles are views of it.
        grid = self.vqgan.detokenize(tokens, params.is_seamless).to(torch.uint8).cpu()
        detokenized = time.perf_counter()
        images = [grid, *grid_tiles(grid, params.grid_size)]
        encode = functools.partial(png_bytes, compression=self.png_compression)
        if self.png_pool is None:
            pngs = [encode(image) for image in images]
        else:
            pngs = self.png_pool.run_all(encode, images)
        timings = {
            "decode_s": decoded - started,
            "vqgan_s": detokenized - decoded,
            "png_s": time.perf_counter() - detokenized,
        }
        return Rendered(grid_png=pngs[0], tile_pngs=pngs[1:], timings=timings)


def batch_rows_for_memory(model: MinDalle) -> int:
    """The decoder rows whose KV caches fit in half the free memory (the GPU's, or the host's).

    A row's cache is layers × 2 (keys, values) × 256 positions × embed_count numbers; the
    activations of a step add a fraction of that, covered by using only half the memory.
    """
    config = model.config
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    row_bytes = config.layer_count * 2 * IMAGE_TOKEN_COUNT * config.embed_count * itemsize
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    rows = int(free * 0.5 // row_bytes)
    return max(2, min(rows, MAX_BATCH_ROWS))
