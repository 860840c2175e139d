from __future__ import annotations

from pathlib import Path

import pytest

from model.random_weights import SMALL_CONFIG, write_random_weights

__all__ = ["SMALL_CONFIG"]


@pytest.fixture(scope="session")
def small_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random model in min-dalle's file layout, written once per test session."""
    root = tmp_path_factory.mktemp("small-model")
    write_random_weights(root, SMALL_CONFIG, is_mega=False, seed=1)
    return root
