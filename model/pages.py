"""The batch decoder's memory and attention: pages of preallocated slots, one job per slot.

A page serves jobs of one grid size N: a fixed number of slots of 2·N decoder rows each, with
every slot's KV caches (rows, H, 256, D) per layer, its two text rows' cross-attention keys and
values, and each row's next input (previous token, position). Slot s owns decoder rows
[s·2N, (s+1)·2N) and text rows 2s (unconditioned) and 2s + 1.

A step's batch is the rows of each page's first `used` slots, page after page (`spans`). The
attention functions here take one page's share of a step's queries, keys and values and write
and read that page's caches; model/batch.py runs the rest of the decoder over all rows at once.
See model/batch.py for why attention is split this way (batch invariance).

A page also holds its slots' sampling: each image row's settings, key (model/sampler.py) and
tokens, and `advance` draws the next token of every row and moves the rows on, with no read on
the host: a CUDA graph captures it with the forward.
"""

from __future__ import annotations

import itertools
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from model.bart import DalleBartDecoder, TextContext
from model.config import IMAGE_TOKEN_COUNT
from model.generate import START_TOKEN, SamplingSettings
from model.sampler import draw, image_key, step_keys, supercondition, width_for


class Occupant(Protocol):
    """What a page needs to know of the job in a slot."""

    @property
    def slot(self) -> int: ...

    @property
    def position(self) -> int: ...

    @property
    def rows(self) -> int: ...


class Page:
    """Preallocated state for up to `slots` jobs of `image_count` images each."""

    _ids = itertools.count()

    def __init__(self, decoder: DalleBartDecoder, image_count: int, slots: int, dtype: torch.dtype):
        config = decoder.config
        self.device = decoder.embed_tokens.weight.device
        self.heads, self.head_dim = config.attention_head_count, config.head_dim
        rows = slots * 2 * image_count
        self.id = next(self._ids)  # never reused: part of the CUDA graph keys
        self.image_count = image_count
        self.jobs: list[Occupant | None] = [None] * slots

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=self.device)

        cache_shape = (rows, self.heads, IMAGE_TOKEN_COUNT, self.head_dim)
        text_shape = (2 * slots, self.heads, config.text_token_count, self.head_dim)
        self.keys = [zeros(*cache_shape) for _ in range(config.layer_count)]
        self.values = [zeros(*cache_shape) for _ in range(config.layer_count)]
        self.text_keys = [zeros(*text_shape) for _ in range(config.layer_count)]
        self.text_values = [zeros(*text_shape) for _ in range(config.layer_count)]
        self.text_mask = torch.ones(
            (2 * slots, 1, 1, config.text_token_count), dtype=torch.bool, device=self.device
        )
        # Each row's next input. Free rows keep decoding harmless garbage; no job reads it.
        self.prev = torch.full((rows,), START_TOKEN, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        # Sampling, per image row (slot s owns rows [s·N, (s+1)·N)).
        images = slots * image_count
        self.tokens = torch.full(
            (images, IMAGE_TOKEN_COUNT), START_TOKEN, dtype=torch.long, device=self.device
        )
        self.image_keys = torch.zeros(images, dtype=torch.long, device=self.device)
        self.temperature = torch.ones((images, 1), device=self.device)
        self.factor = torch.ones((images, 1), device=self.device)
        self.top_k = torch.ones(images, dtype=torch.long, device=self.device)
        self.widths = [1] * slots  # each slot's topk width (`sampler.width_for`)
        # Positions below `replay` keep the checkpoint's token; `mismatches` counts the draws
        # there that differ from it. `is_nan`: the row's logits held NaN at some step.
        self.replay = torch.zeros(images, dtype=torch.long, device=self.device)
        self.mismatches = torch.zeros(images, dtype=torch.long, device=self.device)
        self.is_nan = torch.zeros(images, dtype=torch.bool, device=self.device)

    @property
    def slot_rows(self) -> int:
        return 2 * self.image_count

    @property
    def used(self) -> int:
        """Slots up to the last occupied one: the step computes these (free ones among them as
        padding)."""
        return max((slot + 1 for slot, job in enumerate(self.jobs) if job is not None), default=0)

    def free_slot(self) -> int | None:
        return next((slot for slot, job in enumerate(self.jobs) if job is None), None)

    def rows_of(self, slot: int) -> slice:
        return slice(slot * self.slot_rows, (slot + 1) * self.slot_rows)

    def images_of(self, slot: int) -> slice:
        return slice(slot * self.image_count, (slot + 1) * self.image_count)

    def take(
        self,
        job: Occupant,
        text_rows: list[TextContext],
        seed: int,
        settings: SamplingSettings,
        checkpoint: Tensor | None = None,
    ) -> None:
        """Give `job.slot` to `job`: its two text rows (unconditioned, conditioned), each of one
        row, are copied in, its decoder rows start at the start token, and its caches are
        zeroed. Page attention reads every cached position up to the page's furthest row with
        weight 0 beyond the row's own; 0 · x is 0 only while x is finite, so what an earlier
        occupant left (a NaN, if its numbers overflowed) must not stay.

        Its image rows get the seed's keys and the settings; with `checkpoint` (N, p), the first
        p tokens are the checkpoint's and are replayed, not drawn."""
        slot = job.slot
        self.jobs[slot] = job
        images = self.images_of(slot)
        image_keys = [image_key(seed, image) for image in range(self.image_count)]
        self.image_keys[images] = torch.tensor(image_keys, device=self.device)
        self.temperature[images] = settings.temperature
        self.factor[images] = settings.supercondition_factor
        self.top_k[images] = settings.top_k
        self.widths[slot] = width_for(settings.top_k)
        self.tokens[images] = START_TOKEN
        replay = 0 if checkpoint is None else checkpoint.shape[1]
        if checkpoint is not None:
            self.tokens[images, :replay] = checkpoint.to(self.device)
        self.replay[images] = replay
        self.mismatches[images] = 0
        self.is_nan[images] = False
        for row, text in enumerate(text_rows, start=2 * slot):
            for layer, (keys, values) in enumerate(zip(text.keys, text.values, strict=True)):
                self.text_keys[layer][row : row + 1] = keys
                self.text_values[layer][row : row + 1] = values
            self.text_mask[row : row + 1] = text.attention_mask
        rows = self.rows_of(slot)
        for cache in (*self.keys, *self.values):
            cache[rows].zero_()
        self.prev[rows] = START_TOKEN
        self.positions[rows] = 0

    def leave(self, slot: int) -> None:
        self.jobs[slot] = None

    def advance(self, logits: Tensor, width: int | None) -> None:
        """Draw the next token of the first slots' image rows from their decoder rows' logits
        (rows, V), and move those rows on: the token is written at each image row's position
        (kept from the checkpoint while replaying), fed as both its rows' next input, and every
        row's position advances. Free slots among them draw harmless garbage.

        `width` (≥ every slot's top_k) samples all rows at once; None samples slot by slot with
        each slot's own width, so that no row's arithmetic depends on another's (on the CPU,
        where a tensor's shape decides which of its elements vectorised code computes)."""
        rows, images = logits.shape[0], self.image_count
        first = slice(0, rows // 2)
        guided = supercondition(logits, self.factor[first], images)
        positions = self.positions[:rows].view(-1, 2, images)[:, 0].reshape(-1)
        keys = step_keys(self.image_keys[first], positions)
        temperature, top_k = self.temperature[first], self.top_k[first]
        if width is not None:
            drawn, is_nan = draw(guided, temperature, top_k, keys, width)
        else:
            drawn = torch.zeros_like(positions)
            is_nan = torch.zeros_like(positions, dtype=torch.bool)
            for slot, job in enumerate(self.jobs[: rows // self.slot_rows]):
                if job is not None:
                    part, width = self.images_of(slot), self.widths[slot]
                    drawn[part], is_nan[part] = draw(
                        guided[part], temperature[part], top_k[part], keys[part], width
                    )
        self.is_nan[first] |= is_nan
        tokens, at = self.tokens[first], positions[:, None]
        is_replay = positions < self.replay[first]
        kept = torch.where(is_replay, tokens.gather(1, at)[:, 0], drawn)
        self.mismatches[first] += is_replay & (drawn != kept)
        tokens.scatter_(1, at, kept[:, None])
        self.prev[:rows].view(-1, 2, images).copy_(kept.view(-1, 1, images).expand(-1, 2, -1))
        # Free rows advance too (harmlessly); a new job resets its slot's rows.
        self.positions[:rows].add_(1).clamp_(max=IMAGE_TOKEN_COUNT - 1)

    def state(self) -> list[Tensor]:
        """Copies of what `advance` changes (a step also writes the caches, but at positions
        that the same step writes again with the same values)."""
        return [t.clone() for t in self._moving()]

    def restore(self, state: list[Tensor]) -> None:
        for tensor, saved in zip(self._moving(), state, strict=True):
            tensor.copy_(saved)

    def _moving(self) -> list[Tensor]:
        return [self.prev, self.positions, self.tokens, self.mismatches, self.is_nan]

    def self_mask(self, rows: int, length: int) -> Tensor:
        """(rows, 1, 1, length): which cached positions each row attends to (page attention)."""
        attended = torch.arange(length, device=self.device) <= self.positions[:rows, None]
        return attended[:, None, None, :]

    def self_attention(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
    ) -> Tensor:
        """Write the rows' keys and values at their positions; attend over their caches.

        With `mask` (page attention, on CUDA) in one write and one attention for the page;
        without, per job over exactly its filled positions (on the CPU).
        """
        rows, heads, head_dim = q.shape[0], self.heads, self.head_dim
        q, k, v = (t.view(rows, heads, 1, head_dim) for t in (q, k, v))
        keys, values = self.keys[layer], self.values[layer]
        if mask is not None:
            every_row = torch.arange(rows, device=self.device)
            positions = self.positions[:rows]
            keys[every_row, :, positions] = k[:, :, 0]
            values[every_row, :, positions] = v[:, :, 0]
            # Spelled out rather than F.scaled_dot_product_attention: on an H200 its kernel gave
            # different results from run to run once more than 128 positions were filled.
            length = mask.shape[-1]
            scores = torch.matmul(q, keys[:rows, :, :length].transpose(-1, -2)).float()
            scores = scores.mul_(head_dim**-0.5).masked_fill_(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).to(q.dtype)  # (rows, H, 1, length)
            return torch.matmul(weights, values[:rows, :, :length]).view(rows, -1)
        out = torch.zeros(rows, heads * head_dim, dtype=q.dtype, device=q.device)
        for job in self.jobs:
            if job is None:
                continue
            at, rows_of = job.position, self.rows_of(job.slot)
            keys[rows_of, :, at : at + 1] = k[rows_of]
            values[rows_of, :, at : at + 1] = v[rows_of]
            h = F.scaled_dot_product_attention(
                q[rows_of], keys[rows_of, :, : at + 1], values[rows_of, :, : at + 1]
            )
            out[rows_of] = h.view(job.rows, -1)
        return out

    def cross_attention(self, layer: int, q: Tensor) -> Tensor:
        """Each slot's rows, grouped by text row, attend to that slot's text: (rows, E)."""
        rows, heads, head_dim = q.shape[0], self.heads, self.head_dim
        text_rows, images = 2 * rows // self.slot_rows, self.image_count
        q = q.view(text_rows, images, heads, head_dim).transpose(1, 2)  # (2·slots, H, N, D)
        out = F.scaled_dot_product_attention(
            q,
            self.text_keys[layer][:text_rows],
            self.text_values[layer][:text_rows],
            attn_mask=self.text_mask[:text_rows],
        )
        return out.transpose(1, 2).reshape(rows, -1)


def spans(layout: list[tuple[Page, int]]) -> list[tuple[Page, slice]]:
    """Each page's rows in a step's batch: its first `used` slots, page after page."""
    spans, start = [], 0
    for page, used in layout:
        spans.append((page, slice(start, start + used * page.slot_rows)))
        start += used * page.slot_rows
    return spans


def stack(parts: list[Tensor], padding: int) -> Tensor:
    """The parts' rows one after the other, then `padding` rows of zeros."""
    if padding:
        parts = [*parts, parts[0].new_zeros(padding, parts[0].shape[1])]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
