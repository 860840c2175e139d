from __future__ import annotations

import os
from pathlib import Path

import pytest

from model.random_weights import SMALL_CONFIG, write_random_weights

__all__ = ["SMALL_CONFIG"]

# A test that builds a model on a folder without weights must never download the real
# multi-GB checkpoints: missing weights come from nowhere unless a test serves them itself.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.pop("DALLE_FARM_WEIGHTS_URL", None)


@pytest.fixture(scope="session")
def small_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random model in min-dalle's file layout, written once per test session."""
    root = tmp_path_factory.mktemp("small-model")
    write_random_weights(root, SMALL_CONFIG, is_mega=False, seed=1)
    return root
