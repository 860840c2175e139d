"""worker.vqgan_batches: job threads that finish together share a VQGAN decode, each grid with
exactly the pixels it gets alone (float32, CPU), and a failed shared decode fails no one.

Threads are made to meet deterministically: a forward pre-hook on the VQGAN's decoder (a real
torch hook; nothing is mocked) holds the first decode until the other threads wait behind it.
A decode costs about a second per 256×256 image here, so the grids are 1×1 and few.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from model import MinDalle
from model.config import VQGAN_CODE_COUNT
from tests.farm_helpers import wait_for
from worker.vqgan_batches import AUTO_CUDA_IMAGES, VQGanBatches, batch_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WAIT_S = 120  # only reached when something is broken


def grid(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VQGAN_CODE_COUNT, (1, 256), generator=generator)


@pytest.fixture(scope="module")
def model(small_models_root: Path) -> MinDalle:
    model = MinDalle(small_models_root, device="cpu", is_mega=False, is_verbose=False)
    model.vqgan()  # loaded once, so that hooks have a module to hold
    return model


@pytest.fixture(scope="module")
def grids() -> list[torch.Tensor]:
    return [grid(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def alone(model: MinDalle, grids: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model.detokenize(tokens) for tokens in grids]


class Hold:
    """A pre-hook on the VQGAN decoder: records each call's batch size; the first call waits
    until `release` is set; `fail_over` makes calls of more images than that raise."""

    def __init__(self, model: MinDalle, fail_over: int | None = None) -> None:
        assert model.detokenizer is not None
        self.sizes: list[int] = []
        self.release = threading.Event()
        self.fail_over = fail_over
        self.handle = model.detokenizer.decoder.register_forward_pre_hook(self.hook)

    def hook(self, _module: Any, args: tuple[torch.Tensor, ...]) -> None:
        self.sizes.append(len(args[0]))
        if len(self.sizes) == 1:
            assert self.release.wait(WAIT_S)
        if self.fail_over is not None and len(args[0]) > self.fail_over:
            raise RuntimeError("CUDA out of memory (a test's stand-in)")


@pytest.fixture
def hold(model: MinDalle) -> Iterator[Callable[..., Hold]]:
    hooks: list[Hold] = []

    def make(*args: Any, **kwargs: Any) -> Hold:
        hooks.append(Hold(model, *args, **kwargs))
        return hooks[-1]

    yield make
    for hook in hooks:
        hook.release.set()
        hook.handle.remove()


def meet(
    batches: VQGanBatches, hook: Hold, grids: list[torch.Tensor]
) -> list[Future[torch.Tensor]]:
    """grids[0]'s thread leads a decode held by `hook`; the others arrive and wait behind it."""
    pool = ThreadPoolExecutor(len(grids))
    first = pool.submit(batches.detokenize, grids[0])
    wait_for(lambda: len(hook.sizes) == 1, WAIT_S, "the first decode to start")
    rest = [pool.submit(batches.detokenize, tokens) for tokens in grids[1:]]
    wait_for(lambda: len(batches._waiting) == len(rest), WAIT_S, "the others to wait")
    hook.release.set()
    pool.shutdown(wait=False)
    return [first, *rest]


def test_threads_that_finish_together_share_decodes_of_up_to_max_images(
    model: MinDalle, grids: list[torch.Tensor], alone: list[torch.Tensor], hold: Any
) -> None:
    batches = VQGanBatches(model, max_images=2)
    hook = hold()
    extra = grid(3)
    results = [future.result(WAIT_S) for future in meet(batches, hook, [*grids, extra])]
    # The first alone; of the three that waited, the first two together, then the last.
    assert hook.sizes == [1, 2, 1]
    assert batches.decodes == 3
    for own, shared in zip([*alone, model.detokenize(extra)], results, strict=True):
        assert torch.equal(own, shared)


def test_a_failed_shared_decode_decodes_each_grid_alone(
    model: MinDalle, grids: list[torch.Tensor], alone: list[torch.Tensor], hold: Any
) -> None:
    batches = VQGanBatches(model, max_images=8)
    hook = hold(fail_over=1)  # any decode of more than one image fails
    results = [future.result(WAIT_S) for future in meet(batches, hook, grids)]
    assert hook.sizes == [1, 2, 1, 1]  # the shared one failed; then one by one
    assert all(map(torch.equal, results, alone))


def test_a_grid_that_fails_alone_fails_only_its_own_thread(
    model: MinDalle, grids: list[torch.Tensor], alone: list[torch.Tensor], hold: Any
) -> None:
    batches = VQGanBatches(model, max_images=8)
    hook = hold(fail_over=0)  # every decode fails
    futures = meet(batches, hook, grids[:2])
    for future in futures:
        with pytest.raises(RuntimeError, match="out of memory"):
            future.result(WAIT_S)
    hook.handle.remove()
    assert torch.equal(batches.detokenize(grids[0]), alone[0])  # the next decode works


def test_one_image_means_each_job_alone_and_auto_depends_on_the_device() -> None:
    assert batch_images(0, torch.device("cpu")) == 1
    assert batch_images(0, torch.device("cuda")) == AUTO_CUDA_IMAGES
    assert batch_images(5, torch.device("cpu")) == 5
    with pytest.raises(ValueError, match="at least 1"):
        VQGanBatches(None, 0)  # type: ignore[arg-type]


def test_the_check_keeps_batches_on_the_cpu(model: MinDalle) -> None:
    batches = VQGanBatches(model, max_images=2)
    assert batches.check() is True
    assert batches.max_images == 2


def test_the_check_turns_batches_off_where_neighbours_change_pixels(model: MinDalle) -> None:
    assert model.detokenizer is not None

    def batch_dependent(_module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + 0.01 * len(args[0])  # as a kernel picked per batch shape might round

    handle = model.detokenizer.decoder.register_forward_hook(batch_dependent)
    try:
        batches = VQGanBatches(model, max_images=2)
        assert batches.check() is False
    finally:
        handle.remove()
    assert batches.max_images == 1
