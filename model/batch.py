"""Continuous batching: one decoder step for many jobs at once, each at its own position.

A job is one prompt's grid: 2·N decoder rows (N unconditioned, then N conditioned), its own
seed and sampling settings, and its own torch.Generator. Jobs join and leave between steps;
nobody waits for anybody.

Memory is preallocated in pages (`_Page`). A page serves jobs of one grid size: a fixed number
of slots of 2·N rows each, with every slot's KV caches (rows, H, 256, D) per layer, its two text
rows' cross-attention keys/values, and each row's next input (previous token, position). A job
takes a free slot of a page of its size, and a new page is allocated when none is free. Text
rows are encoded and projected once however many jobs use them (`_row_context`): the
unconditioned row `<s></s>` of nearly every prompt, a prompt asked with many seeds.

A step runs the decoder over the used slots of every page, concatenated:

- weight-heavy, row-wise parts (every Linear, the layer norms, lm_head) run once over all rows,
  so a step reads the weights once per row block however many jobs there are;
- attention runs once per page: the new keys/values are written at each row's own position, the
  queries attend to their rows' caches (masked beyond each row's position) and to their slot's
  text rows;
- sampling (supercondition, top-k, temperature, the job's generator) runs per job.

Nothing in a step waits for the device: positions, tokens and masks live in device tensors, and
the host only counts steps. On CUDA the step can be replayed from a CUDA graph captured once per
page layout and attention length (`use_cuda_graphs`).

Batch invariance: a job's tokens depend only on its text, seed, settings, the weights and
`block_rows`; never on which other jobs share its steps, when it joined, or whether it was
resumed from a checkpoint. Three things would break this with a plain batched forward:

1. A matrix product's result for a row can depend on the total row count: MKL, oneDNN and cuBLAS
   pick kernels (and reduction orders, split-K on a GPU) by shape, and `model.bart.linear` itself
   switches paths by row count. So `_linear` pads the rows to a multiple of `block_rows` and
   multiplies fixed-size blocks: every row always sees the same (block_rows, K) × (K, N) product,
   and a row's result does not depend on its slot in the block or on the other rows in it
   (checked in tests/test_batch.py). The cost: a lone job pays for `block_rows` rows of compute,
   and rows beyond one block read the weights again (from cache, on a GPU, where one matrix fits
   in L2).
2. CPU elementwise kernels vectorise the bulk of a tensor and compute its tail (and the edges of
   the chunks that threads split it into) with scalar code; for GELU the scalar `erf` differs
   from the vector one in the last bit. Where a row falls in those chunks depends on the batch, so
   on the CPU GELU runs per job, on a tensor whose shape is the job's own. CUDA kernels apply the
   same function to every element, so there it runs once.
3. A CPU attention kernel's sums over keys group them by vector lanes, so attending over more
   (masked) positions than a row's own can round differently. On the CPU self-attention therefore
   runs per job over its exact positions; on CUDA it runs once per page over the positions up to
   the page's furthest row, rounded up to CUDA_ATTENTION_BUCKET, with later positions masked.

Layer norms are row-wise reductions (one row never sees another, nor the row count), and the
remaining elementwise ops (add, multiply) are exactly rounded, so they run over all rows at once.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from model.bart import DalleBartDecoder, DalleBartEncoder, DecoderLayer, TextContext, linear
from model.config import IMAGE_TOKEN_COUNT, VQGAN_CODE_COUNT
from model.generate import START_TOKEN, SamplingSettings, logits_to_probs, sample, supercondition

if TYPE_CHECKING:
    from model.min_dalle import MinDalle

logger = logging.getLogger(__name__)

# Encoded text rows kept for reuse, least recently used dropped first.
TEXT_ROWS_KEPT = 32

# Rows per block of every batched matrix product (see the module docstring, point 1).
DEFAULT_BLOCK_ROWS = 16
# On a GPU one weight read serves many more rows before the step stops being bound by it. On an
# H200, cuBLAS gave Mega's fc2 rows that differ below 128 rows and agree from 128 up
# (bench/bench_gpu.py, kernels_case).
CUDA_BLOCK_ROWS = 128

# Decoder rows per page (a page of a grid with more rows holds one job).
PAGE_ROWS = 256
# On CUDA, self-attention reads the positions up to the page's furthest row, rounded up to a
# multiple of this (fewer distinct shapes, hence fewer CUDA graphs).
CUDA_ATTENTION_BUCKET = 64
# CUDA graphs kept, least recently used dropped first (one per page layout and attention length).
CUDA_GRAPHS_KEPT = 16


class BatchFull(ValueError):
    """A job's rows do not fit under the decoder's max_rows."""


class _Page:
    """Preallocated state for up to `slots` jobs of `image_count` images each.

    Slot s owns decoder rows [s·2N, (s+1)·2N) and text rows 2s (unconditioned), 2s + 1.
    """

    _ids = itertools.count()

    def __init__(self, decoder: DalleBartDecoder, image_count: int, slots: int, dtype: torch.dtype):
        config = decoder.config
        device = decoder.embed_tokens.weight.device
        heads, head_dim, text_length = (
            config.attention_head_count,
            config.head_dim,
            config.text_token_count,
        )
        rows = slots * 2 * image_count
        self.id = next(self._ids)  # never reused: part of the CUDA graph keys
        self.image_count = image_count
        self.jobs: list[_Job | None] = [None] * slots

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        cache_shape = (rows, heads, IMAGE_TOKEN_COUNT, head_dim)
        text_shape = (2 * slots, heads, text_length, head_dim)
        self.keys = [zeros(*cache_shape) for _ in range(config.layer_count)]
        self.values = [zeros(*cache_shape) for _ in range(config.layer_count)]
        self.text_keys = [zeros(*text_shape) for _ in range(config.layer_count)]
        self.text_values = [zeros(*text_shape) for _ in range(config.layer_count)]
        self.text_mask = torch.ones((2 * slots, 1, 1, text_length), dtype=torch.bool, device=device)
        # Each row's next input. Free rows keep decoding harmless garbage; they are never sampled.
        self.prev = torch.full((rows,), START_TOKEN, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def slot_rows(self) -> int:
        return 2 * self.image_count

    @property
    def used(self) -> int:
        """Slots up to the last occupied one: the step computes these (free ones among them as
        padding)."""
        return max((slot + 1 for slot, job in enumerate(self.jobs) if job is not None), default=0)

    def rows_of(self, slot: int) -> slice:
        return slice(slot * self.slot_rows, (slot + 1) * self.slot_rows)

    def take(self, job: _Job, slot: int, text_rows: list[TextContext]) -> None:
        """Give the slot to `job`: its two text rows (unconditioned, conditioned), each of one
        row, are copied in, and its decoder rows start at the start token."""
        self.jobs[slot] = job
        for row, text in enumerate(text_rows, start=2 * slot):
            for layer, (keys, values) in enumerate(zip(text.keys, text.values, strict=True)):
                self.text_keys[layer][row : row + 1] = keys
                self.text_values[layer][row : row + 1] = values
            self.text_mask[row : row + 1] = text.attention_mask
        self.prev[self.rows_of(slot)] = START_TOKEN
        self.positions[self.rows_of(slot)] = 0


@dataclass(eq=False)
class _Job:
    id: str
    page: _Page
    slot: int
    generator: torch.Generator
    settings: SamplingSettings
    temperature: Tensor  # (1,) float32, as in model.generate
    factor: Tensor  # (1,) float32
    tokens: Tensor  # (N, 256); positions not generated yet hold START_TOKEN
    replay: int = 0  # the first `replay` tokens come from a checkpoint
    position: int = 0  # the next position to decode
    replayed: Tensor | None = None  # (N, replay) the tokens drawn while replaying
    replay_mismatches: int = 0  # replayed tokens the sampler did not reproduce

    @property
    def rows(self) -> int:
        return 2 * self.tokens.shape[0]


class BatchDecoder:
    """Decode many jobs together, continuously. Not thread-safe: drive it from one thread."""

    def __init__(
        self,
        model: MinDalle,
        max_rows: int | None = None,
        block_rows: int | None = None,
        use_cuda_graphs: bool = True,
    ):
        if model.encoder is None or model.decoder is None:
            raise ValueError("BatchDecoder needs a MinDalle built with is_reusable=True")
        if max_rows is not None and max_rows < 2:
            raise ValueError(f"max_rows must be at least 2 (one image), got {max_rows}")
        is_cuda = model.device.type == "cuda"
        if block_rows is None:
            block_rows = CUDA_BLOCK_ROWS if is_cuda else DEFAULT_BLOCK_ROWS
        if block_rows < 0:
            raise ValueError(f"block_rows must be positive (or 0: no blocks), got {block_rows}")
        self.model = model
        self.encoder: DalleBartEncoder = model.encoder
        self.decoder: DalleBartDecoder = model.decoder
        self.device = model.device
        self.dtype = model.dtype
        self.max_rows = max_rows
        self.block_rows = block_rows
        self.use_cuda_graphs = use_cuda_graphs and is_cuda
        # Self-attention once per page (CUDA), or per job over its exact positions (CPU); see
        # the module docstring, point 3.
        self.page_attention = is_cuda
        self._jobs: dict[str, _Job] = {}
        self._pages: dict[int, list[_Page]] = {}  # by image count
        self._text_rows: OrderedDict[tuple[int, ...], TextContext] = OrderedDict()
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, Tensor]] = OrderedDict()

    # -- jobs -----------------------------------------------------------------------------

    @property
    def active(self) -> list[str]:
        return list(self._jobs)

    @property
    def rows(self) -> int:
        """Decoder rows of the active jobs."""
        return sum(job.rows for job in self._jobs.values())

    def progress(self, job_id: str) -> int:
        """Image tokens known so far (checkpointed tokens count as known while replaying)."""
        job = self._job(job_id)
        return max(job.position, job.replay)

    def tokens(self, job_id: str) -> Tensor:
        """(N, progress) tokens known so far, e.g. for a checkpoint."""
        job = self._job(job_id)
        return job.tokens[:, : self.progress(job_id)].clone()

    def replay_mismatches(self, job_id: str) -> int:
        """Replayed checkpoint tokens that sampling did not reproduce (0 unless numerics moved)."""
        return self._job(job_id).replay_mismatches

    def _job(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise KeyError(f"no active job {job_id!r}") from None

    @torch.inference_mode()
    def add(
        self,
        job_id: str,
        text: str,
        seed: int,
        grid_size: int,
        settings: SamplingSettings,
        tokens: Tensor | None = None,
    ) -> None:
        """Encode the prompt and join the batch at the next step.

        With `tokens` (N, p), the first p image tokens of an earlier run with the same arguments,
        the job resumes: its first p steps recompute the cache and draw the generator exactly as
        the original steps did, but keep the checkpoint's tokens; the final tokens equal an
        uninterrupted run's.
        """
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} is already in the batch")
        if not isinstance(grid_size, int) or isinstance(grid_size, bool) or grid_size < 1:
            raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
        image_count = grid_size**2
        if self.max_rows is not None and self.rows + 2 * image_count > self.max_rows:
            raise BatchFull(
                f"job {job_id!r} needs {2 * image_count} rows; {self.rows} of max_rows="
                f"{self.max_rows} are in use"
            )
        image_tokens = torch.full(
            (image_count, IMAGE_TOKEN_COUNT), START_TOKEN, dtype=torch.long, device=self.device
        )
        replay = 0
        if tokens is not None:
            replay = self._check_checkpoint(tokens, image_count)
            image_tokens[:, :replay] = tokens.to(self.device)

        # Each text row is encoded and projected once however many jobs use it.
        text_rows = [self._row_context(row) for row in self.model._text_tokens(text)]
        page, slot = self._free_slot(image_count)
        job = _Job(
            id=job_id,
            page=page,
            slot=slot,
            generator=self.model._generator(seed),
            settings=settings,
            temperature=torch.tensor([settings.temperature], device=self.device),
            factor=torch.tensor([settings.supercondition_factor], device=self.device),
            tokens=image_tokens,
            replay=replay,
            replayed=image_tokens[:, :replay].clone() if replay else None,
        )
        page.take(job, slot, text_rows)
        self._jobs[job_id] = job

    def _free_slot(self, image_count: int) -> tuple[_Page, int]:
        """The first free slot of a page for this grid size, else a slot of a new page.

        Empty pages stay allocated (and their CUDA graphs valid) until a new page is needed;
        then every empty page is freed first.
        """
        pages = self._pages.setdefault(image_count, [])
        for page in pages:
            for slot, job in enumerate(page.jobs):
                if job is None:
                    return page, slot
        for size, kept in self._pages.items():
            self._pages[size] = [page for page in kept if page.used]
            if len(self._pages[size]) < len(kept):
                self._graphs.clear()  # some of them replay into a freed page
        page_rows = PAGE_ROWS if self.max_rows is None else min(PAGE_ROWS, self.max_rows)
        page = _Page(self.decoder, image_count, max(1, page_rows // (2 * image_count)), self.dtype)
        self._pages[image_count].append(page)
        return page, 0

    def _leave(self, job: _Job) -> None:
        del self._jobs[job.id]
        job.page.jobs[job.slot] = None

    def _row_context(self, row: Tensor) -> TextContext:
        key = tuple(row.tolist())
        context = self._text_rows.pop(key, None)
        if context is None:
            tokens = row[None]
            context = self.decoder.text_context(self.encoder(tokens), tokens)
        self._text_rows[key] = context  # most recently used last
        while len(self._text_rows) > TEXT_ROWS_KEPT:
            self._text_rows.popitem(last=False)
        return context

    @staticmethod
    def _check_checkpoint(tokens: Tensor, image_count: int) -> int:
        if tokens.dim() != 2 or tokens.shape[0] != image_count:
            raise ValueError(
                f"checkpoint tokens must be ({image_count}, p), got {tuple(tokens.shape)}"
            )
        if tokens.dtype != torch.long:
            raise ValueError(f"checkpoint tokens must be int64, got {tokens.dtype}")
        replay = tokens.shape[1]
        if replay >= IMAGE_TOKEN_COUNT:
            raise ValueError(f"a checkpoint of {replay} tokens is a finished job")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= VQGAN_CODE_COUNT):
            raise ValueError(f"checkpoint tokens must lie in [0, {VQGAN_CODE_COUNT})")
        return replay

    def cancel(self, job_id: str) -> None:
        """Drop a job; it takes no part in the next step. Unknown ids are ignored."""
        job = self._jobs.get(job_id)
        if job is not None:
            self._leave(job)

    # -- decoding -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[str, Tensor]]:
        """Decode one token for every active job; return (id, (N, 256) tokens) of those done."""
        if not self._jobs:
            return []
        layout = [(page, page.used) for pages in self._pages.values() for page in pages]
        layout = [(page, used) for page, used in layout if used]  # empty pages take no part
        furthest = max(job.position for job in self._jobs.values())
        length = furthest + 1
        if self.page_attention:
            bucket = CUDA_ATTENTION_BUCKET
            length = min(IMAGE_TOKEN_COUNT, -(-length // bucket) * bucket)
        if self.use_cuda_graphs:
            logits = self._replay(layout, length)
        else:
            logits = self._forward(layout, length)

        starts = {page.id: rows.start for page, rows in _spans(layout)}
        done: list[tuple[str, Tensor]] = []
        for job in list(self._jobs.values()):
            rows = job.page.rows_of(job.slot)
            first = starts[job.page.id] + rows.start
            token = self._sample(job, logits[first : first + job.rows])
            job.page.prev[rows].view(2, -1).copy_(token.expand(2, -1))
            job.position += 1
            if job.position == IMAGE_TOKEN_COUNT:
                done.append((job.id, job.tokens))
                self._leave(job)
        for page, _ in layout:
            # Free rows advance too (harmlessly); a new job resets its slot's rows.
            page.positions.add_(1).clamp_(max=IMAGE_TOKEN_COUNT - 1)
        return done

    def _sample(self, job: _Job, logits: Tensor) -> Tensor:
        """Draw the job's next token per image; return the token its rows continue from."""
        mixed = supercondition(logits.float(), job.factor)
        probs = logits_to_probs(mixed, job.temperature, job.settings.top_k)
        sampled = sample(probs, job.generator)
        if job.position >= job.replay:
            job.tokens[:, job.position] = sampled
            return sampled
        # Resuming: the draw above advanced the generator as the original step did; the
        # checkpoint's token stays (and should be the one just drawn). The draws are compared
        # once, at the end of the replay, so that no step waits for the device.
        assert job.replayed is not None
        job.replayed[:, job.position] = sampled
        if job.position + 1 == job.replay:
            self._check_replay(job)
        return job.tokens[:, job.position]

    @staticmethod
    def _check_replay(job: _Job) -> None:
        assert job.replayed is not None
        job.replay_mismatches = int((job.replayed != job.tokens[:, : job.replay]).sum())
        job.replayed = None
        if job.replay_mismatches:
            logger.warning(
                "job %s: %d of its %d checkpoint tokens were not reproduced (the weights, "
                "dtype or device changed since); the checkpoint's are kept",
                job.id, job.replay_mismatches, job.replay * job.tokens.shape[0],
            )  # fmt: skip

    def _replay(self, layout: list[tuple[_Page, int]], length: int) -> Tensor:
        """`_forward` replayed from a CUDA graph captured for this layout and length.

        Every input the graph reads (weights, caches, text rows, prev tokens, positions) lives at
        a fixed address, so a captured step stays valid until a page it reads is freed.
        """
        key = (tuple((page.id, used) for page, used in layout), length)
        entry = self._graphs.pop(key, None)
        if entry is None:
            # Warm up outside the capture (kernel selection, workspaces). The warm-up step writes
            # the same keys and values at the same positions as the replay below.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(layout, length)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._forward(layout, length)
            entry = (graph, logits)
        self._graphs[key] = entry  # most recently used last
        while len(self._graphs) > CUDA_GRAPHS_KEPT:
            self._graphs.popitem(last=False)
        graph, logits = entry
        graph.replay()
        return logits

    def _linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """x @ weight.T over fixed blocks of block_rows rows (x's rows are a multiple of it), or
        in one product with block_rows=0."""
        if not self.block_rows or x.shape[0] == self.block_rows:
            return linear(x, weight)
        return torch.cat([linear(block, weight) for block in x.split(self.block_rows)])

    def _forward(self, layout: list[tuple[_Page, int]], length: int) -> Tensor:
        """The logits of one step for the rows of each page's first `used` slots, page after
        page: (rows, VQGAN_CODE_COUNT), padding rows at the end."""
        decoder = self.decoder
        spans = _spans(layout)
        inputs = [
            decoder.embed_tokens(page.prev[: rows.stop - rows.start])
            + decoder.embed_positions(page.positions[: rows.stop - rows.start])
            for page, rows in spans
        ]
        total, block = spans[-1][1].stop, self.block_rows or 1
        padding = -(-total // block) * block - total
        x = decoder.layernorm_embedding(_stack(inputs, padding))  # (rows + padding, E)
        masks = [self._self_mask(page, rows.stop - rows.start, length) for page, rows in spans]

        for i, layer in enumerate(cast("list[DecoderLayer]", decoder.layers)):
            attn = layer.self_attn
            h = layer.pre_self_attn_layer_norm(x)
            q, k, v = (self._linear(h, p.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            out = _stack(
                [
                    self._self_attention(page, i, q[rows], k[rows], v[rows], mask)
                    for (page, rows), mask in zip(spans, masks, strict=True)
                ],
                padding,
            )
            x = x + layer.self_attn_layer_norm(self._linear(out, attn.out_proj.weight))

            attn = layer.encoder_attn
            q = self._linear(layer.pre_encoder_attn_layer_norm(x), attn.q_proj.weight)
            out = _stack([self._cross_attention(page, i, q[rows]) for page, rows in spans], padding)
            x = x + layer.encoder_attn_layer_norm(self._linear(out, attn.out_proj.weight))

            glu = layer.glu
            h = glu.ln0(x)
            gate, up = self._linear(h, glu.fc0.weight), self._linear(h, glu.fc1.weight)
            x = x + self._linear(glu.ln1(self._gelu(gate, spans) * up), glu.fc2.weight)

        x = decoder.final_ln(x)
        # Only the VQGAN's codes can be sampled; the remaining rows of lm_head are never read.
        return self._linear(x, decoder.lm_head.weight[:VQGAN_CODE_COUNT])

    def _self_mask(self, page: _Page, rows: int, length: int) -> Tensor | None:
        """(rows, 1, 1, length): which cached positions each row attends to (page attention)."""
        if not self.page_attention:
            return None
        attended = torch.arange(length, device=self.device) <= page.positions[:rows, None]
        return attended[:, None, None, :]

    def _self_attention(
        self, page: _Page, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
    ) -> Tensor:
        """Write the rows' keys and values at their positions; attend over their caches."""
        config = self.decoder.config
        rows, heads, head_dim = q.shape[0], config.attention_head_count, config.head_dim
        q, k, v = (t.view(rows, heads, 1, head_dim) for t in (q, k, v))
        keys, values = page.keys[layer], page.values[layer]
        if mask is not None:
            # One write and one attention for the whole page (see the module docstring, point 3).
            every_row = torch.arange(rows, device=self.device)
            positions = page.positions[:rows]
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
        for job in page.jobs:
            if job is None:
                continue
            at, rows_of = job.position, page.rows_of(job.slot)
            keys[rows_of, :, at : at + 1] = k[rows_of]
            values[rows_of, :, at : at + 1] = v[rows_of]
            h = F.scaled_dot_product_attention(
                q[rows_of], keys[rows_of, :, : at + 1], values[rows_of, :, : at + 1]
            )
            out[rows_of] = h.view(job.rows, -1)
        return out

    def _cross_attention(self, page: _Page, layer: int, q: Tensor) -> Tensor:
        """Each slot's rows, grouped by text row, attend to that slot's text: (rows, E)."""
        config = self.decoder.config
        rows, heads, head_dim = q.shape[0], config.attention_head_count, config.head_dim
        text_rows, images = 2 * rows // page.slot_rows, page.image_count
        q = q.view(text_rows, images, heads, head_dim).transpose(1, 2)  # (2·slots, H, N, D)
        out = F.scaled_dot_product_attention(
            q,
            page.text_keys[layer][:text_rows],
            page.text_values[layer][:text_rows],
            attn_mask=page.text_mask[:text_rows],
        )
        return out.transpose(1, 2).reshape(rows, -1)

    def _gelu(self, x: Tensor, spans: list[tuple[_Page, slice]]) -> Tensor:
        """GELU, per job on the CPU (see the module docstring, point 2)."""
        if self.device.type == "cuda":
            return F.gelu(x)
        out = x.clone()
        for page, rows in spans:
            for job in page.jobs:
                if job is not None:
                    first = rows.start + page.rows_of(job.slot).start
                    out[first : first + job.rows] = F.gelu(x[first : first + job.rows])
        return out


def _spans(layout: list[tuple[_Page, int]]) -> list[tuple[_Page, slice]]:
    """Each page's rows in a step's batch: its first `used` slots, page after page."""
    spans, start = [], 0
    for page, used in layout:
        spans.append((page, slice(start, start + used * page.slot_rows)))
        start += used * page.slot_rows
    return spans


def _stack(parts: list[Tensor], padding: int) -> Tensor:
    """The parts' rows one after the other, then `padding` rows of zeros."""
    if padding:
        parts = [*parts, parts[0].new_zeros(padding, parts[0].shape[1])]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
