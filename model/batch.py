"""Continuous batching: one decoder step for many jobs at once, each at its own position.

A job is one prompt's grid: 2·N decoder rows (N unconditioned, then N conditioned), its own
KV caches, its own text context (cross-attention keys/values for its two text rows, built in
`add` from rows encoded once and shared by every job that has them: the unconditioned row of
nearly every prompt, a prompt asked with many seeds) and its own torch.Generator. Jobs join
and leave between steps; nobody waits for anybody.

Every step splits the decoder in two:

- weight-heavy, row-wise parts (every Linear, the layer norms, lm_head) run once over the
  concatenated rows of all jobs, so a step reads the weights once per row block however many
  jobs there are;
- cheap per-job parts (writing K/V at the job's position, self-attention over the job's filled
  positions, cross-attention against the job's text, GELU, supercondition, top-k, temperature and
  sampling with the job's generator) run in a loop over jobs.

Batch invariance: a job's tokens depend only on its text, seed, settings, the weights and
`block_rows` — never on which other jobs share its steps, when it joined, or whether it was
resumed from a checkpoint. Two things on CPU would break this with a plain batched forward:

1. A float32 GEMM's result for a row depends on the total row count: MKL and oneDNN pick their
   kernels (and reduction orders) by shape, and `model.bart.linear` itself switches paths by
   row count.
   So `_linear` pads the rows to a multiple of `block_rows` and multiplies fixed-size blocks:
   every row always sees the same (block_rows, K) × (K, N) product, and a row's result does not
   depend on its slot in the block or on the other rows in it (checked in tests/test_batch.py).
   The cost: a lone 2-row job pays for `block_rows` rows of compute, and rows beyond one block
   read the weights again (ceil(R / block_rows) reads per step instead of one). 16 rows is about
   where a decoder step stops being bound by weight reads on a many-core CPU.
2. Elementwise kernels vectorise the bulk of a tensor and compute its tail (and the edges of the
   chunks that threads split it into) with scalar code; for GELU the scalar `erf` differs from the
   vector one in the last bit. Where a row falls in those chunks depends on the batch, so GELU
   runs per job, on a tensor whose shape is the job's own.

Layer norms are row-wise reductions (one row never sees another, nor the row count), and the
remaining elementwise ops (add, multiply) are exactly rounded, so they run over all rows at once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from model.bart import (
    DalleBartDecoder,
    DalleBartEncoder,
    DecoderLayer,
    KVCache,
    TextContext,
    linear,
)
from model.config import IMAGE_TOKEN_COUNT, VQGAN_CODE_COUNT
from model.generate import START_TOKEN, SamplingSettings, logits_to_probs, sample, supercondition

if TYPE_CHECKING:
    from model.min_dalle import MinDalle

logger = logging.getLogger(__name__)

# Encoded text rows kept for reuse, least recently used dropped first.
TEXT_ROWS_KEPT = 32

# Rows per block of every batched matrix product (see the module docstring, point 1).
DEFAULT_BLOCK_ROWS = 16
# On a GPU one weight read serves many more rows before the step stops being bound by it, and
# reading the weights once per 16 rows would waste most of a step. (Not measured: no GPU was
# available to this project yet.)
CUDA_BLOCK_ROWS = 256


class BatchFull(ValueError):
    """A job's rows do not fit under the decoder's max_rows."""


@dataclass(eq=False)
class _Job:
    id: str
    text: TextContext
    caches: list[KVCache]
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

    def prev_tokens(self) -> Tensor:
        """(2N,) the decoder's input: the start token, or the previous token for both rows."""
        if self.position == 0:
            return torch.full(
                (self.rows,), START_TOKEN, dtype=torch.long, device=self.tokens.device
            )
        return self.tokens[:, self.position - 1].repeat(2)


class BatchDecoder:
    """Decode many jobs together, continuously. Not thread-safe: drive it from one thread."""

    def __init__(self, model: MinDalle, max_rows: int | None = None, block_rows: int | None = None):
        if model.encoder is None or model.decoder is None:
            raise ValueError("BatchDecoder needs a MinDalle built with is_reusable=True")
        if max_rows is not None and max_rows < 2:
            raise ValueError(f"max_rows must be at least 2 (one image), got {max_rows}")
        if block_rows is None:
            block_rows = CUDA_BLOCK_ROWS if model.device.type == "cuda" else DEFAULT_BLOCK_ROWS
        if block_rows < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        self.model = model
        self.encoder: DalleBartEncoder = model.encoder
        self.decoder: DalleBartDecoder = model.decoder
        self.device = model.device
        self.dtype = model.dtype
        self.max_rows = max_rows
        self.block_rows = block_rows
        self._jobs: dict[str, _Job] = {}  # insertion order = row order in the batch
        self._text_rows: OrderedDict[tuple[int, ...], TextContext] = OrderedDict()

    # -- jobs -----------------------------------------------------------------------------

    @property
    def active(self) -> list[str]:
        return list(self._jobs)

    @property
    def rows(self) -> int:
        """Decoder rows of the active jobs (before padding to whole blocks)."""
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

        text_context = self._text_context(text)
        self._jobs[job_id] = _Job(
            id=job_id,
            text=text_context,
            caches=self.decoder.new_caches(2 * image_count, self.dtype, self.device),
            generator=self.model._generator(seed),
            settings=settings,
            temperature=torch.tensor([settings.temperature], device=self.device),
            factor=torch.tensor([settings.supercondition_factor], device=self.device),
            tokens=image_tokens,
            replay=replay,
        )

    def _text_context(self, text: str) -> TextContext:
        """The job's two text rows (unconditioned, conditioned), each encoded and projected once
        however many jobs use it: most texts share the unconditioned row `<s></s>`, and a
        dataset often asks for one prompt with many seeds."""
        rows = [self._row_context(row) for row in self.model._text_tokens(text)]
        return TextContext(
            keys=[torch.cat(layer) for layer in zip(*(row.keys for row in rows), strict=True)],
            values=[torch.cat(layer) for layer in zip(*(row.values for row in rows), strict=True)],
            attention_mask=torch.cat([row.attention_mask for row in rows]),
        )

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
        self._jobs.pop(job_id, None)

    # -- decoding -------------------------------------------------------------------------

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

    def _linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """x @ weight.T over fixed blocks of block_rows rows (x's rows are a multiple of it)."""
        return torch.cat([linear(block, weight) for block in x.split(self.block_rows)])

    def _slices(self, jobs: list[_Job]) -> Iterator[tuple[_Job, slice]]:
        start = 0
        for job in jobs:
            yield job, slice(start, start + job.rows)
            start += job.rows

    @torch.inference_mode()
    def step(self) -> list[tuple[str, Tensor]]:
        """Decode one token for every active job; return (id, (N, 256) tokens) of those done."""
        jobs = list(self._jobs.values())
        if not jobs:
            return []
        decoder, config = self.decoder, self.decoder.config
        heads, head_dim = config.attention_head_count, config.head_dim
        rows = sum(job.rows for job in jobs)
        padded = -(-rows // self.block_rows) * self.block_rows

        # Embeddings: padding rows read the start token at position 0 and are never used.
        prev = torch.full((padded,), START_TOKEN, dtype=torch.long, device=self.device)
        positions = torch.zeros(padded, dtype=torch.long, device=self.device)
        for job, rows_of in self._slices(jobs):
            prev[rows_of] = job.prev_tokens()
            positions[rows_of] = job.position
        x = decoder.embed_tokens(prev) + decoder.embed_positions(positions)
        x = decoder.layernorm_embedding(x)  # (padded, E)

        for i, layer in enumerate(cast("list[DecoderLayer]", decoder.layers)):
            # Self-attention: batched projections, per-job cache and attention.
            attn = layer.self_attn
            h = layer.pre_self_attn_layer_norm(x)
            q, k, v = (self._linear(h, p.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            out = torch.zeros_like(h)
            for job, rows_of in self._slices(jobs):
                qj, kj, vj = (t[rows_of].view(job.rows, 1, heads, head_dim) for t in (q, k, v))
                keys, values = job.caches[i].update(
                    job.position, kj.transpose(1, 2), vj.transpose(1, 2)
                )
                hj = F.scaled_dot_product_attention(qj.transpose(1, 2), keys, values)
                out[rows_of] = hj.transpose(1, 2).reshape(job.rows, -1)
            x = x + layer.self_attn_layer_norm(self._linear(out, attn.out_proj.weight))

            # Cross-attention: each job's rows, grouped by text row, read that job's text.
            attn = layer.encoder_attn
            q = self._linear(layer.pre_encoder_attn_layer_norm(x), attn.q_proj.weight)
            out = torch.zeros_like(q)
            for job, rows_of in self._slices(jobs):
                qj = q[rows_of].view(2, job.rows // 2, heads, head_dim).transpose(1, 2)
                hj = F.scaled_dot_product_attention(
                    qj,
                    job.text.keys[i],
                    job.text.values[i],
                    attn_mask=job.text.attention_mask,
                )  # (2, H, N, D)
                out[rows_of] = hj.transpose(1, 2).reshape(job.rows, -1)
            x = x + layer.encoder_attn_layer_norm(self._linear(out, attn.out_proj.weight))

            # GLU: batched projections, GELU per job (see the module docstring, point 2).
            glu = layer.glu
            h = glu.ln0(x)
            gate, up = self._linear(h, glu.fc0.weight), self._linear(h, glu.fc1.weight)
            for _, rows_of in self._slices(jobs):
                gate[rows_of] = F.gelu(gate[rows_of])
            x = x + self._linear(glu.ln1(gate * up), glu.fc2.weight)

        x = decoder.final_ln(x)
        # Only the VQGAN's codes can be sampled; the remaining rows of lm_head are never read.
        logits = self._linear(x, decoder.lm_head.weight[:VQGAN_CODE_COUNT])

        done: list[tuple[str, Tensor]] = []
        for job, rows_of in self._slices(jobs):
            settings = job.settings
            mixed = supercondition(logits[rows_of].float(), job.factor)
            probs = logits_to_probs(mixed, job.temperature, settings.top_k)
            sampled = sample(probs, job.generator)
            if job.position < job.replay:
                # Resuming: the draw above advanced the generator as the original step did;
                # the checkpoint's token stays (and should be the one just drawn). The draws are
                # compared once, at the end of the replay, so that no step waits for the device.
                if job.replayed is None:
                    job.replayed = torch.empty_like(job.tokens[:, : job.replay])
                job.replayed[:, job.position] = sampled
                if job.position + 1 == job.replay:
                    self._check_replay(job)
            else:
                job.tokens[:, job.position] = sampled
            job.position += 1
            if job.position == IMAGE_TOKEN_COUNT:
                done.append((job.id, job.tokens))
                del self._jobs[job.id]
        return done
