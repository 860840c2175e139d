"""One decoder step for the rows of many pages, batch-invariant: logits, then each page's draw.

BatchDecoder (model/batch.py) owns the jobs; `PagedForward` runs a step over the used slots of
every page (model/pages.py), concatenated: the decoder's forward, with q/k/v and fc0/fc1 each as
one product (`DalleBartDecoder.fused_weights`), then each page's sampling (`Page.advance`). On a
GPU the whole step is replayed from a CUDA graph. Its operations are a set from
model/batch_ops.py: TorchOps, whose invariance is argued below, or TritonOps (model/kernels/).

Batch invariance: a job's tokens depend only on its text, seed, settings, the weights and
`block_rows`; never on which other jobs share its steps, when it joined, or whether it was
resumed from a checkpoint. Three things would break this with a plain batched forward:

1. A matrix product's result for a row can depend on the total row count: MKL, oneDNN and cuBLAS
   pick kernels (and reduction orders, split-K on a GPU) by shape, and `model.bart.linear` itself
   switches paths by row count. So `TorchOps.linear` pads the rows to a multiple of `block_rows` and
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

import logging
from collections import OrderedDict
from typing import cast

import torch
from torch import Tensor

from model.bart import DalleBartDecoder, DecoderLayer
from model.batch_ops import StepOps, step_ops
from model.config import IMAGE_TOKEN_COUNT, VQGAN_CODE_COUNT
from model.pages import Page, spans, stack

logger = logging.getLogger(__name__)

# On CUDA with TorchOps, self-attention reads the positions up to the page's furthest row,
# rounded up to a multiple of this (fewer distinct shapes, hence fewer CUDA graphs).
CUDA_ATTENTION_BUCKET = 64
# CUDA graphs kept, least recently used dropped first (one per page layout, attention length and
# top-k width).
CUDA_GRAPHS_KEPT = 16


class PagedForward:
    """The decoder's step over pages, with the operations named `kernels` ("torch" or
    "triton"). `block_rows` (TorchOps only) None: the device's default."""

    def __init__(
        self,
        decoder: DalleBartDecoder,
        kernels: str = "torch",
        block_rows: int | None = None,
        use_cuda_graphs: bool = True,
    ):
        self.decoder = decoder
        self.device = decoder.embed_tokens.weight.device
        self.ops: StepOps = step_ops(kernels, self.device, block_rows)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.fused = decoder.fused_weights()
        self._graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()
        # Captures so far, and of those, of a key captured before (dropped as least recently
        # used, or by forget_graphs): what a steady state should keep at zero.
        self.captures = 0
        self.recaptures = 0
        self._captured: set[tuple] = set()

    @property
    def kernels(self) -> str:
        return self.ops.name

    def forget_graphs(self) -> None:
        """Drop every CUDA graph (some of them replay into a page that is being freed)."""
        self._graphs.clear()

    def step(self, layout: list[tuple[Page, int]], furthest: int, width: int | None) -> None:
        """Decode one token for each page's first `used` slots; `furthest` is the furthest
        row's position, `width` the draw's top-k width (None: per job, see Page.advance)."""
        length = 0  # unused unless the operations attend over a common length
        if self.ops.uses_length:
            bucket = CUDA_ATTENTION_BUCKET
            length = min(IMAGE_TOKEN_COUNT, -(-(furthest + 1) // bucket) * bucket)
        if self.use_cuda_graphs:
            self._replay(layout, length, width)
        else:
            self.run(layout, length, width)

    def _replay(self, layout: list[tuple[Page, int]], length: int, width: int | None) -> None:
        """`run` replayed from a CUDA graph captured for this layout, length and width.

        Every input the graph reads (weights, caches, text rows, prev tokens, positions,
        sampling settings) lives at a fixed address, so a captured step stays valid until a
        page it reads is freed. The warm-up step before a capture moves its pages on, so their
        state is put back before the replay (the capture itself only records).
        """
        key = (tuple((page.id, used) for page, used in layout), length, width)
        graph = self._graphs.pop(key, None)
        if graph is None:
            saved = [page.state() for page, _ in layout]
            # Warm up outside the capture (kernel selection, workspaces, Triton compiles).
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.run(layout, length, width)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for (page, _), state in zip(layout, saved, strict=True):
                page.restore(state)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.run(layout, length, width)
            self.captures += 1
            self.recaptures += key in self._captured
            self._captured.add(key)
            logger.info(
                "CUDA graph captured: %d pages, %d slots, top-k width %s (%d captures, %d of "
                "them again after being dropped)",
                len(layout), sum(used for _, used in layout), width, self.captures,
                self.recaptures,
            )  # fmt: skip
        self._graphs[key] = graph  # most recently used last
        while len(self._graphs) > CUDA_GRAPHS_KEPT:
            self._graphs.popitem(last=False)
        graph.replay()

    def run(self, layout: list[tuple[Page, int]], length: int, width: int | None) -> None:
        """One step, eagerly: the logits of each page's rows, then each page's draw."""
        logits = self.logits(layout, length)
        for page, rows in spans(layout):
            page.advance(logits[rows], width)

    def logits(self, layout: list[tuple[Page, int]], length: int) -> Tensor:
        """The logits of one step for the rows of each page's first `used` slots, page after
        page: (rows, VQGAN_CODE_COUNT), padding rows at the end."""
        decoder, ops = self.decoder, self.ops
        step_spans = spans(layout)
        inputs = [
            decoder.embed_tokens(page.prev[: rows.stop - rows.start])
            + decoder.embed_positions(page.positions[: rows.stop - rows.start])
            for page, rows in step_spans
        ]
        total, block = step_spans[-1][1].stop, ops.block_rows or 1
        padding = -(-total // block) * block - total
        x = ops.norm(stack(inputs, padding), decoder.layernorm_embedding)  # (rows + padding, E)
        layers = cast("list[DecoderLayer]", decoder.layers)
        h = ops.norm(x, layers[0].pre_self_attn_layer_norm)
        for i, layer in enumerate(layers):
            q, k, v = ops.linear(h, self.fused[i].qkv).chunk(3, dim=-1)
            out = stack(
                [
                    ops.self_attention(page, i, q[rows], k[rows], v[rows], length)
                    for page, rows in step_spans
                ],
                padding,
            )
            attn = layer.self_attn
            x, h = ops.add_norm(
                x, ops.linear(out, attn.out_proj.weight), layer.pre_encoder_attn_layer_norm,
                layer.self_attn_layer_norm,
            )  # fmt: skip

            attn = layer.encoder_attn
            q = ops.linear(h, attn.q_proj.weight)
            out = stack([page.cross_attention(i, q[rows]) for page, rows in step_spans], padding)
            x, h = ops.add_norm(
                x, ops.linear(out, attn.out_proj.weight), layer.glu.ln0,
                layer.encoder_attn_layer_norm,
            )  # fmt: skip

            glu = layer.glu
            h = ops.glu_norm(ops.linear(h, self.fused[i].fc01), glu.ln1, step_spans)
            after = layers[i + 1].pre_self_attn_layer_norm if i + 1 < len(layers) else None
            after = decoder.final_ln if after is None else after
            x, h = ops.add_norm(x, ops.linear(h, glu.fc2.weight), after, None)
        # Only the VQGAN's codes can be sampled; the remaining rows of lm_head are never read.
        return ops.linear(h, decoder.lm_head.weight[:VQGAN_CODE_COUNT])
