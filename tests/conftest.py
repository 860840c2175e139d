from __future__ import annotations

from pathlib import Path

import pytest

from model.config import ModelConfig
from model.random_weights import write_random_weights

# Small enough to decode 256 tokens in a fraction of a second; the VQGAN has its real (fixed) size.
SMALL_CONFIG = ModelConfig(
    layer_count=2,
    attention_head_count=4,
    embed_count=64,
    glu_embed_count=96,
    text_vocab_count=512,
    image_vocab_count=16384,
    text_token_count=64,
)


@pytest.fixture(scope="session")
def small_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random model in min-dalle's file layout, written once per test session."""
    root = tmp_path_factory.mktemp("small-model")
    write_random_weights(root, SMALL_CONFIG, is_mega=False, seed=1)
    return root
