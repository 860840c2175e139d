"""One decoder step's logits for the rows of many pages, batch-invariant.

BatchDecoder (model/batch.py) owns the jobs and their sampling; `PagedForward` computes a step's
logits over the used slots of every page (model/pages.py), concatenated, and replays it from a
CUDA graph on a GPU.

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

from collections import OrderedDict
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from model.bart import DalleBartDecoder, DecoderLayer, linear
from model.config import IMAGE_TOKEN_COUNT, VQGAN_CODE_COUNT
from model.pages import Page, spans, stack

# Rows per block of every batched matrix product (see the module docstring, point 1).
DEFAULT_BLOCK_ROWS = 16
# On a GPU one weight read serves many more rows before the step stops being bound by it. On an
# H200, cuBLAS gave Mega's fc2 rows that differ below 128 rows and agree from 128 up
# (bench/bench_gpu.py, kernels_case).
CUDA_BLOCK_ROWS = 128
# On CUDA, self-attention reads the positions up to the page's furthest row, rounded up to a
# multiple of this (fewer distinct shapes, hence fewer CUDA graphs).
CUDA_ATTENTION_BUCKET = 64
# CUDA graphs kept, least recently used dropped first (one per page layout and attention length).
CUDA_GRAPHS_KEPT = 16


class PagedForward:
    """The decoder's forward over pages. `block_rows` None: the device's default."""

    def __init__(
        self, decoder: DalleBartDecoder, block_rows: int | None = None, use_cuda_graphs: bool = True
    ):
        self.decoder = decoder
        self.device = decoder.embed_tokens.weight.device
        is_cuda = self.device.type == "cuda"
        if block_rows is None:
            block_rows = CUDA_BLOCK_ROWS if is_cuda else DEFAULT_BLOCK_ROWS
        if block_rows < 0:
            raise ValueError(f"block_rows must be positive (or 0: no blocks), got {block_rows}")
        self.block_rows = block_rows
        self.use_cuda_graphs = use_cuda_graphs and is_cuda
        # Self-attention once per page (CUDA), or per job over its exact positions (CPU); see
        # the module docstring, point 3.
        self.page_attention = is_cuda
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, Tensor]] = OrderedDict()

    def forget_graphs(self) -> None:
        """Drop every CUDA graph (some of them replay into a page that is being freed)."""
        self._graphs.clear()

    def logits(self, layout: list[tuple[Page, int]], furthest: int) -> Tensor:
        """(rows, VQGAN_CODE_COUNT): the step's logits for each page's first `used` slots, page
        after page, padding rows at the end; `furthest` is the furthest row's position."""
        length = furthest + 1
        if self.page_attention:
            bucket = CUDA_ATTENTION_BUCKET
            length = min(IMAGE_TOKEN_COUNT, -(-length // bucket) * bucket)
        if self.use_cuda_graphs:
            return self._replay(layout, length)
        return self.forward(layout, length)

    def _replay(self, layout: list[tuple[Page, int]], length: int) -> Tensor:
        """`forward` replayed from a CUDA graph captured for this layout and length.

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
                self.forward(layout, length)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.forward(layout, length)
            entry = (graph, logits)
        self._graphs[key] = entry  # most recently used last
        while len(self._graphs) > CUDA_GRAPHS_KEPT:
            self._graphs.popitem(last=False)
        graph, logits = entry
        graph.replay()
        return logits

    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """x @ weight.T over fixed blocks of block_rows rows (x's rows are a multiple of it), or
        in one product with block_rows=0."""
        if not self.block_rows or x.shape[0] == self.block_rows:
            return linear(x, weight)
        return torch.cat([linear(block, weight) for block in x.split(self.block_rows)])

    def forward(self, layout: list[tuple[Page, int]], length: int) -> Tensor:
        """The logits of one step for the rows of each page's first `used` slots, page after
        page: (rows, VQGAN_CODE_COUNT), padding rows at the end."""
        decoder = self.decoder
        step_spans = spans(layout)
        inputs = [
            decoder.embed_tokens(page.prev[: rows.stop - rows.start])
            + decoder.embed_positions(page.positions[: rows.stop - rows.start])
            for page, rows in step_spans
        ]
        total, block = step_spans[-1][1].stop, self.block_rows or 1
        padding = -(-total // block) * block - total
        x = decoder.layernorm_embedding(stack(inputs, padding))  # (rows + padding, E)
        # Self-attention once per page (CUDA), or per job over its exact positions (CPU); see
        # the module docstring, point 3.
        masks = [
            page.self_mask(rows.stop - rows.start, length) if self.page_attention else None
            for page, rows in step_spans
        ]

        for i, layer in enumerate(cast("list[DecoderLayer]", decoder.layers)):
            attn = layer.self_attn
            h = layer.pre_self_attn_layer_norm(x)
            q, k, v = (self.linear(h, p.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            out = stack(
                [
                    page.self_attention(i, q[rows], k[rows], v[rows], mask)
                    for (page, rows), mask in zip(step_spans, masks, strict=True)
                ],
                padding,
            )
            x = x + layer.self_attn_layer_norm(self.linear(out, attn.out_proj.weight))

            attn = layer.encoder_attn
            q = self.linear(layer.pre_encoder_attn_layer_norm(x), attn.q_proj.weight)
            out = stack([page.cross_attention(i, q[rows]) for page, rows in step_spans], padding)
            x = x + layer.encoder_attn_layer_norm(self.linear(out, attn.out_proj.weight))

            glu = layer.glu
            h = glu.ln0(x)
            gate, up = self.linear(h, glu.fc0.weight), self.linear(h, glu.fc1.weight)
            x = x + self.linear(glu.ln1(self._gelu(gate, step_spans) * up), glu.fc2.weight)

        x = decoder.final_ln(x)
        # Only the VQGAN's codes can be sampled; the remaining rows of lm_head are never read.
        return self.linear(x, decoder.lm_head.weight[:VQGAN_CODE_COUNT])

    def _gelu(self, x: Tensor, step_spans: list[tuple[Page, slice]]) -> Tensor:
        """GELU, per job on the CPU (see the module docstring, point 2)."""
        if self.device.type == "cuda":
            return F.gelu(x)
        out = x.clone()
        for page, rows in step_spans:
            for job in page.jobs:
                if job is not None:
                    first = rows.start + page.rows_of(job.slot).start
                    out[first : first + job.rows] = F.gelu(x[first : first + job.rows])
        return out
