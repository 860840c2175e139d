"""DALL·E Mini/Mega inference, compatible with min-dalle 0.4.11.

`from model import MinDalle, ModelConfig`. MinDalle is imported lazily so that torch-free parts
(model.config, model.tokenizer) can be used by the API process without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model.config import ModelConfig
from model.errors import (
    ConfigError,
    ModelError,
    WeightsError,
    WeightsFormatError,
    WeightsNotFoundError,
)

if TYPE_CHECKING:
    from model.min_dalle import MinDalle

__all__ = [
    "ConfigError",
    "MinDalle",
    "ModelConfig",
    "ModelError",
    "WeightsError",
    "WeightsFormatError",
    "WeightsNotFoundError",
]


def __getattr__(name: str) -> Any:
    if name == "MinDalle":
        from model.min_dalle import MinDalle

        return MinDalle
    raise AttributeError(f"module 'model' has no attribute {name!r}")
