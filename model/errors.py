"""Errors raised by the model package.

    ModelError
    ├── WeightsError               the weight files cannot be used
    │   ├── WeightsNotFoundError   files are missing and could not be downloaded
    │   └── WeightsFormatError     a file is unreadable, truncated, or has a wrong key or shape
    └── ConfigError                a ModelConfig or config.json is invalid

Every message names the file (and key) involved and what to do about it.
"""


class ModelError(Exception):
    """Base class for every error the model package raises on purpose."""


class WeightsError(ModelError):
    """The weight files cannot be used."""


class WeightsNotFoundError(WeightsError):
    """Weight files are missing and could not be downloaded."""


class WeightsFormatError(WeightsError):
    """A weight file is unreadable or truncated, or has a missing, unexpected or misshapen key."""


class ConfigError(ModelError):
    """A model configuration is invalid."""
