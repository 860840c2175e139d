from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.weights.files import WeightPaths
from model.weights.random_flax import write_flax_checkpoints
from model.weights.random_weights import SMALL_CONFIG, write_random_weights

__all__ = ["SMALL_CONFIG"]

# A test that builds a model on a folder without weights must never download the real
# multi-GB checkpoints: missing weights come from nowhere unless a test serves them itself.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.pop("DALLE_FARM_WEIGHTS_URL", None)
# Without a GPU, Triton kernels (model/kernels/) run in Triton's interpreter, on numpy, in
# float32. Triton reads this when a kernel is defined, so it is set before any is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def small_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random model in min-dalle's file layout, written once per test session."""
    root = tmp_path_factory.mktemp("small-model")
    write_random_weights(root, SMALL_CONFIG, is_mega=False, seed=1)
    return root


@pytest.fixture(scope="session")
def original(small_models_root: Path) -> WeightPaths:
    """The small model's paths: the weights that conversions and fetches must reproduce."""
    return WeightPaths(small_models_root, is_mega=False)


@pytest.fixture(scope="session")
def flax_hub(original: WeightPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small model as the hub's Flax checkpoints: dalle-mini/{dalle-mini,vqgan_…} below it."""
    root = tmp_path_factory.mktemp("hub")
    write_flax_checkpoints(original, SMALL_CONFIG, root)
    return root


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures(...)`): on a
    shared 2-core runner, OpenMP's spinning threads otherwise make a small-model decoder step
    up to 100× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
