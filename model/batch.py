"""Continuous batching: one decoder step for many jobs at once, each at its own position.

A job is one prompt's grid: 2·N decoder rows (N unconditioned, then N conditioned), its own
seed and sampling settings. Jobs join and leave between steps; nobody waits for anybody.

Memory is preallocated in pages (model/pages.py): a page serves jobs of one grid size, a job
takes a free slot of a page of its size, and a new page is allocated when none is free. Text
rows are encoded and projected once however many jobs use them (`_row_context`): the
unconditioned row `<s></s>` of nearly every prompt, a prompt asked with many seeds.

A step runs the decoder over the used slots of every page, concatenated:

- weight-heavy, row-wise parts (every Linear, the layer norms, lm_head) run once over all rows,
  so a step reads the weights once per row block however many jobs there are;
- attention runs once per page: the new keys/values are written at each row's own position, the
  queries attend to their rows' caches (masked beyond each row's position) and to their slot's
  text rows;
- sampling (supercondition, temperature, top-k and the draw) runs once per page over all its
  rows, with each row's settings in device tensors and counter-based noise keyed by (seed,
  image, position) (model/sampler.py): a farm seed's images are not min-dalle's.

Nothing in a step waits for the device: positions, tokens, settings and masks live in device
tensors, and the host only counts steps (and reads the jobs' NaN flags every NAN_CHECK_EVERY
steps and when jobs finish). On CUDA the whole step, sampling included, is replayed from a CUDA
graph captured once per page layout (`use_cuda_graphs`).

Isolation: a job's failure never reaches another job. Settings the sampler cannot compute are
refused by `add` (ValueError). No row's result depends on another row's values (every op is
row-wise, or per page slot), so a job whose numbers go wrong (NaN logits) is dropped and
reported in `StepResult.failed`, and the other jobs' tokens are the ones they would have had
without it. Only a failure of the shared step itself raises.

Batch invariance: a job's tokens depend only on its text, seed, settings, the weights and the
step's operations (`kernels`, `block_rows`); never on which other jobs share its steps, when it
joined, or whether it was resumed from a checkpoint. model/batch_forward.py says how the step
keeps it so, and `self_check` verifies it on the device at hand.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.bart import DalleBartDecoder, DalleBartEncoder, TextContext
from model.batch_forward import PagedForward
from model.config import IMAGE_TOKEN_COUNT, VQGAN_CODE_COUNT
from model.generate import SamplingSettings, check_guided_settings
from model.kernels import triton_available
from model.pages import Page
from model.sampler import width_for

if TYPE_CHECKING:
    from model.min_dalle import MinDalle

logger = logging.getLogger(__name__)

# Encoded text rows kept for reuse, least recently used dropped first.
TEXT_ROWS_KEPT = 32

# Decoder rows per page (a page of a grid with more rows holds one job).
PAGE_ROWS = 256
# Steps between two reads of the jobs' NaN flags (a read waits for the device). A job that
# finishes is checked before its tokens are handed out, whatever the step.
NAN_CHECK_EVERY = 32
# The self-check's batch (rows, at most) and the tokens it compares.
SELF_CHECK_ROWS = 2048
SELF_CHECK_STEPS = 8


class BatchFull(ValueError):
    """A job's rows do not fit under the decoder's max_rows."""


class JobFailed(ValueError):
    """One job could not be decoded (NaN logits); it left the batch, and no other job was
    affected."""


@dataclass
class StepResult:
    """What a step ended: jobs done, with their (N, 256) tokens, and jobs that failed."""

    finished: dict[str, Tensor] = field(default_factory=dict)
    failed: dict[str, JobFailed] = field(default_factory=dict)


@dataclass(eq=False)
class _Job:
    id: str
    page: Page
    slot: int
    settings: SamplingSettings
    replay: int = 0  # the first `replay` tokens come from a checkpoint
    position: int = 0  # the next position to decode
    replay_mismatches: int = 0  # replayed tokens the sampler did not reproduce

    @property
    def rows(self) -> int:
        return 2 * self.page.image_count

    @property
    def images(self) -> slice:
        """This job's images in its page's per-image tensors (tokens, is_nan, mismatches)."""
        return self.page.images_of(self.slot)

    @property
    def tokens(self) -> Tensor:
        """(N, 256), a view of the page's: positions not generated yet hold START_TOKEN."""
        return self.page.tokens[self.images]


class BatchDecoder:
    """Decode many jobs together, continuously. Not thread-safe: drive it from one thread."""

    def __init__(
        self,
        model: MinDalle,
        max_rows: int | None = None,
        block_rows: int | None = None,
        use_cuda_graphs: bool = True,
        kernels: str | None = None,
    ):
        """`kernels`: the step's operations (model/batch_ops.py), "torch" or "triton"; None
        takes "triton" on CUDA where Triton is installed, else "torch". Call `self_check` to
        verify them on the device before serving."""
        if model.encoder is None or model.decoder is None:
            raise ValueError("BatchDecoder needs a MinDalle built with is_reusable=True")
        if max_rows is not None and max_rows < 2:
            raise ValueError(f"max_rows must be at least 2 (one image), got {max_rows}")
        self.model = model
        self.encoder: DalleBartEncoder = model.encoder
        self.decoder: DalleBartDecoder = model.decoder
        self.device = model.device
        self.dtype = model.dtype
        self.max_rows = max_rows
        if kernels is None:
            use_triton = self.device.type == "cuda" and triton_available()
            kernels = "triton" if use_triton else "torch"
        self.paged = PagedForward(self.decoder, kernels, block_rows, use_cuda_graphs)
        # One draw over each page's rows wherever a device applies the same function to every
        # element (CUDA); per job on the CPU, whose vectorised log computes an element by other
        # code depending on where it falls in the tensor (Page.advance).
        self.batched_draw = self.device.type == "cuda"
        self._jobs: dict[str, _Job] = {}
        self._pages: dict[int, list[Page]] = {}  # by image count
        self._text_rows: OrderedDict[tuple[int, ...], TextContext] = OrderedDict()
        self._steps = 0

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
        the job resumes: its first p steps recompute the cache and draw exactly as the original
        steps did, but keep the checkpoint's tokens; the final tokens equal an uninterrupted
        run's.

        Raises ValueError, naming the setting and its range, for what the sampler cannot compute
        (SamplingSettings and `check_guided_settings`), and BatchFull past max_rows.
        """
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} is already in the batch")
        if not isinstance(grid_size, int) or isinstance(grid_size, bool) or grid_size < 1:
            raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
        # SamplingSettings checks itself when built; this one may come from anywhere.
        settings = SamplingSettings(
            settings.temperature, settings.top_k, settings.supercondition_factor
        )
        check_guided_settings(settings)
        image_count = grid_size**2
        if self.max_rows is not None and self.rows + 2 * image_count > self.max_rows:
            raise BatchFull(
                f"job {job_id!r} needs {2 * image_count} rows; {self.rows} of max_rows="
                f"{self.max_rows} are in use"
            )
        replay = 0
        if tokens is not None:
            replay = self._check_checkpoint(tokens, image_count)
        if seed <= 0:  # random, as in min-dalle
            seed = secrets.randbits(63)

        # Each text row is encoded and projected once however many jobs use it.
        text_rows = [self._row_context(row) for row in self.model._text_tokens(text)]
        page, slot = self._free_slot(image_count)
        job = _Job(id=job_id, page=page, slot=slot, settings=settings, replay=replay)
        try:
            page.take(job, text_rows, seed, settings, tokens)
        except BaseException:
            page.leave(slot)  # never a slot held by a job that is not in the batch
            raise
        self._jobs[job_id] = job

    def _free_slot(self, image_count: int) -> tuple[Page, int]:
        """The first free slot of a page for this grid size, else a slot of a new page.

        Empty pages stay allocated (and their CUDA graphs valid) until a new page is needed;
        then every empty page is freed first.
        """
        pages = self._pages.setdefault(image_count, [])
        for page in pages:
            slot = page.free_slot()
            if slot is not None:
                return page, slot
        for size, kept in self._pages.items():
            self._pages[size] = [page for page in kept if page.used]
            if len(self._pages[size]) < len(kept):
                self.paged.forget_graphs()
        page_rows = PAGE_ROWS if self.max_rows is None else min(PAGE_ROWS, self.max_rows)
        page = Page(self.decoder, image_count, max(1, page_rows // (2 * image_count)), self.dtype)
        self._pages[image_count].append(page)
        return page, 0

    def _leave(self, job: _Job) -> None:
        del self._jobs[job.id]
        job.page.leave(job.slot)

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

    # -- the device's check -------------------------------------------------------------

    def self_check(self, rows: int | None = None, steps: int = SELF_CHECK_STEPS) -> bool:
        """Verify, on this device, that a job's tokens are the same alone and in a full batch of
        `rows` rows (default: max_rows, at most SELF_CHECK_ROWS) with the step's operations; if
        they are not, or the operations fail, fall back to "torch" and log why.

        Returns whether the operations in use at the call passed. The check runs on decoders of
        its own; this one's jobs are not touched (call it before adding any)."""
        kernels = self.paged.kernels
        rows = rows or min(self.max_rows or SELF_CHECK_ROWS, SELF_CHECK_ROWS)
        try:
            reason = self._invariance_failure(rows, steps)
        except Exception as error:  # a kernel that does not build or run here
            logger.exception("self-check: the %r kernels failed on %s", kernels, self.device)
            reason = f"raised {type(error).__name__}: {error}"
        if reason is None:
            logger.info("self-check: %r kernels are batch-invariant on %s", kernels, self.device)
            return True
        if kernels == "torch":
            logger.error("self-check: the 'torch' operations %s on %s", reason, self.device)
        else:
            logger.warning(
                "self-check: the %r kernels %s on %s; falling back to 'torch'",
                kernels, reason, self.device,
            )  # fmt: skip
            self.paged = PagedForward(
                self.decoder, "torch", use_cuda_graphs=self.paged.use_cuda_graphs
            )
        return False

    def _invariance_failure(self, rows: int, steps: int) -> str | None:
        """Why a probe job's first `steps` tokens differ alone and among others, or None."""

        def probe_tokens(among_others: bool) -> Tensor:
            decoder = BatchDecoder(
                self.model, kernels="torch", use_cuda_graphs=self.paged.use_cuda_graphs
            )
            decoder.paged.ops = self.paged.ops  # the very operations in use (block_rows too)
            settings = SamplingSettings()
            if among_others:  # a neighbour on each side of its slot, and 4×4 jobs to fill up
                decoder.add("before", "a self-check neighbour", 1, 1, settings)
            decoder.add("probe", "a self-check: one job alone and among others", 7, 1, settings)
            if among_others:
                decoder.add("after", "another self-check neighbour", 2, 1, settings)
                for i in range((rows - 6) // 32):
                    decoder.add(f"filler-{i}", f"self-check filler {i % 8}", 10 + i, 4, settings)
            try:
                for _ in range(steps):
                    decoder.step()
                return decoder.tokens("probe")
            finally:  # a job and its page refer to each other: free the pages now, not at GC
                for job_id in decoder.active:
                    decoder.cancel(job_id)

        alone, among = probe_tokens(False), probe_tokens(True)
        if torch.equal(alone, among):
            return None
        differ = int((alone != among).sum())
        return f"gave a job {differ} of {alone.numel()} other tokens among {rows} rows than alone"

    # -- decoding -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> StepResult:
        """Decode one token for every active job.

        Returns the jobs that finished (and left the batch) with their (N, 256) tokens, and the
        jobs that failed (and left it): one job's failure is its own outcome, never an
        exception. An exception from the step's shared work (out of memory, a bug) raises, and
        no job advanced; the caller decides what becomes of them (cancel, or step again).
        """
        result = StepResult()
        if not self._jobs:
            return result
        layout = [(page, page.used) for pages in self._pages.values() for page in pages]
        layout = [(page, used) for page, used in layout if used]  # empty pages take no part
        jobs = list(self._jobs.values())
        width = None
        if self.batched_draw:
            width = width_for(max(job.settings.top_k for job in jobs))
        self.paged.step(layout, max(job.position for job in jobs), width)
        for job in jobs:
            job.position += 1
            if job.position == job.replay:
                self._check_replay(job)
            if job.position == IMAGE_TOKEN_COUNT:
                result.finished[job.id] = job.tokens.clone()
        self._steps += 1
        if result.finished or self._steps % NAN_CHECK_EVERY == 0:
            self._check_nan(result)
        for job_id in result.finished:
            self._leave(self._jobs[job_id])
        return result

    def _fail(
        self, job: _Job, reason: str, result: StepResult, cause: BaseException | None = None
    ) -> None:
        failure = JobFailed(f"job {job.id!r} could not be decoded: {reason}")
        failure.__cause__ = cause
        result.failed[job.id] = failure
        result.finished.pop(job.id, None)
        self._leave(job)

    def _check_nan(self, result: StepResult) -> None:
        """Fail the jobs whose logits held NaN (one read of every job's flags)."""
        jobs = list(self._jobs.values())
        if not jobs:
            return
        flags = torch.stack([job.page.is_nan[job.images].any() for job in jobs])
        for job, is_nan in zip(jobs, flags.tolist(), strict=True):
            if is_nan:
                reason = (
                    f"its logits became NaN by token {job.position} (the model's numbers "
                    f"overflowed for this prompt and these settings in {self.dtype})"
                )
                logger.warning("job %s: %s", job.id, reason)
                self._fail(job, reason, result)

    @staticmethod
    def _check_replay(job: _Job) -> None:
        """At the end of a resumed job's replay: count the draws that differ from the checkpoint
        (one read, once per job)."""
        job.replay_mismatches = int(job.page.mismatches[job.images].sum())
        if job.replay_mismatches:
            logger.warning(
                "job %s: %d of its %d checkpoint tokens were not reproduced (the weights, "
                "dtype, device or kernels changed since); the checkpoint's are kept",
                job.id, job.replay_mismatches, job.replay * job.tokens.shape[0],
            )  # fmt: skip
