"""The VQGAN over the grids of several finished jobs at once.

Job threads finish their jobs each on their own (worker/engine.py): when a job's tokens are
done, its thread turns them into pixels with the VQGAN. On a GPU one 1×1 or 2×2 grid leaves
most of the device idle, so `VQGanBatches.detokenize` lets the threads that arrive together
share one decode:

    thread A: detokenize(tokens) ── no decode running: A leads ─→ decodes A's grid (+ any
    thread B: detokenize(tokens) ── a decode is running: waits      waiting) ... done: wakes all
    thread C: detokenize(tokens) ── waits ──────────────────────→  B leads: decodes B's and C's

The leader takes its own grid first, then the waiting ones in arrival order, up to max_images
256×256 images, and decodes them with MinDalle.detokenize_many (grids of one kind per call:
seamless or not). No thread waits for a batch to fill: a grid that arrives alone is decoded
alone, at once.

One job never changes or fails another:
- **Pixels.** On the CPU, detokenize_many gives every grid exactly its own pixels (float32, the
  rules in model.vqgan.plan_batches). On CUDA every batch is padded to one shape (`pad`), and
  `check` at startup compares a probe grid decoded alone, at another place in a batch and
  beside other grids, byte for byte; if any differs, the worker decodes each job alone.
- **Failures.** When a shared decode raises (out of memory, say), each of its grids is decoded
  again alone, and only a grid that fails alone fails, in its own thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from model.config import VQGAN_CODE_COUNT
from model.min_dalle import MinDalle

log = logging.getLogger(__name__)

# What DALLE_FARM_VQGAN_BATCH_IMAGES=0 means: on CUDA, one 4×4 grid's worth; on the CPU a
# shared decode is no faster than one per job (BENCHMARKS.md), so each job decodes alone.
AUTO_CUDA_IMAGES = 16


def batch_images(setting: int, device: torch.device) -> int:
    """The max_images a setting of 0 (auto) or n means on `device`."""
    if setting:
        return setting
    return AUTO_CUDA_IMAGES if device.type == "cuda" else 1


@dataclass(eq=False)
class _Grid:
    tokens: Tensor
    is_seamless: bool
    pixels: Tensor | None = None
    error: BaseException | None = None

    @property
    def images(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def done(self) -> bool:
        return self.pixels is not None or self.error is not None


class VQGanBatches:
    """MinDalle.detokenize for many threads at once, sharing decodes (see the module docs)."""

    def __init__(self, model: MinDalle, max_images: int) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.model = model
        self.max_images = max_images
        self.pad = model.device.type == "cuda"
        self._changed = threading.Condition()
        self._waiting: list[_Grid] = []
        self._leading = False
        self.decodes = 0  # shared decodes run (for tests and benchmarks)

    def detokenize(self, tokens: Tensor, is_seamless: bool = False) -> Tensor:
        """(N, 256) tokens of a square grid → (S, S, 3) float pixels, as MinDalle.detokenize."""
        if self.max_images == 1:
            return self.model.detokenize(tokens, is_seamless)
        grid = _Grid(tokens, is_seamless)
        with self._changed:
            self._waiting.append(grid)
            while not grid.done and self._leading:
                self._changed.wait()
            if not grid.done:
                self._leading = True
                batch = self._take(grid)
        if not grid.done:
            try:
                self._decode(batch)
            finally:
                with self._changed:
                    self._leading = False
                    self._changed.notify_all()
        if grid.error is not None:
            raise grid.error
        assert grid.pixels is not None
        return grid.pixels

    def _take(self, own: _Grid) -> list[_Grid]:
        """`own`, then waiting grids of its kind in arrival order, up to max_images images."""
        batch, images = [own], own.images
        for grid in self._waiting:
            if grid is own or grid.is_seamless != own.is_seamless:
                continue
            if images + grid.images > self.max_images:
                break
            batch.append(grid)
            images += grid.images
        self._waiting = [grid for grid in self._waiting if grid not in batch]
        return batch

    def _decode(self, batch: list[_Grid]) -> None:
        try:
            pixels = self.model.detokenize_many(
                [grid.tokens for grid in batch],
                batch[0].is_seamless,
                self.max_images,
                pad=self.pad,
            )
            self.decodes += 1
        except Exception as error:
            if len(batch) == 1:
                batch[0].error = error
                return
            log.warning("a shared VQGAN decode failed (%s); decoding its grids alone", error)
            for grid in batch:
                self._decode([grid])
            return
        for grid, grid_pixels in zip(batch, pixels, strict=True):
            grid.pixels = grid_pixels

    def check(self) -> bool:
        """Whether a probe grid gets the same uint8 pixels alone as at another place in a
        shared decode beside other grids; if not, decode each job alone from now on."""
        if self.max_images == 1:
            return True
        generator = torch.Generator().manual_seed(0)
        probe, other = (
            torch.randint(0, VQGAN_CODE_COUNT, (1, 256), generator=generator) for _ in range(2)
        )
        neighbours = max(1, self.max_images - 1)
        cases = [
            [probe],
            [other, probe],
            [*([other] * neighbours), probe][-self.max_images :],
            [probe, *([probe.flip(1)] * neighbours)][: self.max_images],
        ]
        expected: Tensor | None = None
        same = True
        for index, grids in enumerate(cases):
            if any(list(map(id, grids)) == list(map(id, case)) for case in cases[:index]):
                continue  # with max_images 2, two of the cases are one
            pixels = self.model.detokenize_many(grids, False, self.max_images, pad=self.pad)
            place = next(i for i, grid in enumerate(grids) if grid is probe)
            found = pixels[place].to(torch.uint8).cpu()
            if expected is None:
                expected = found
            elif not torch.equal(expected, found):
                same = False
                break
        if not same:
            log.warning(
                "VQGAN: a grid's pixels depend on the grids decoded beside it on this device; "
                "decoding each job alone (DALLE_FARM_VQGAN_BATCH_IMAGES=1)"
            )
            self.max_images = 1
        return same
