"""Model sizes as data: one ModelConfig, with presets for DALL·E Mini and Mega."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from model.errors import ConfigError

# The VQGAN turns a 16×16 map of codes into a 256×256 image; both models decode that many tokens.
IMAGE_TOKEN_COUNT = 256
VQGAN_CODE_COUNT = 2**14


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the BART encoder/decoder. Field names follow min-dalle's attributes."""

    layer_count: int
    attention_head_count: int
    embed_count: int
    glu_embed_count: int
    text_vocab_count: int
    image_vocab_count: int
    text_token_count: int = 64

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"ModelConfig.{field.name} must be a positive integer, got {value!r}"
                )
        if self.embed_count % self.attention_head_count:
            raise ConfigError(
                f"embed_count ({self.embed_count}) must be divisible by "
                f"attention_head_count ({self.attention_head_count})"
            )
        if self.image_vocab_count < VQGAN_CODE_COUNT:
            raise ConfigError(
                f"image_vocab_count ({self.image_vocab_count}) must be at least the VQGAN's "
                f"{VQGAN_CODE_COUNT} codes"
            )

    @property
    def head_dim(self) -> int:
        return self.embed_count // self.attention_head_count

    @classmethod
    def mini(cls) -> ModelConfig:
        return cls(
            layer_count=12,
            attention_head_count=16,
            embed_count=1024,
            glu_embed_count=2730,
            text_vocab_count=50264,
            image_vocab_count=16384,
        )

    @classmethod
    def mega(cls) -> ModelConfig:
        return cls(
            layer_count=24,
            attention_head_count=32,
            embed_count=2048,
            glu_embed_count=4096,
            text_vocab_count=50272,
            image_vocab_count=16415,
        )

    @classmethod
    def preset(cls, is_mega: bool) -> ModelConfig:
        return cls.mega() if is_mega else cls.mini()

    @classmethod
    def from_json(cls, path: Path, base: ModelConfig) -> ModelConfig:
        """Read a config.json with min-dalle field names; fields it leaves out come from `base`."""
        try:
            fields = json.loads(Path(path).read_text(encoding="utf8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read model config {path}: {err}") from err
        if not isinstance(fields, dict):
            raise ConfigError(f"{path} must hold a JSON object of ModelConfig fields")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(
                f"{path} has unknown fields {unknown}; expected some of {sorted(known)}"
            )
        return dataclasses.replace(base, **fields)

    def to_json(self, path: Path) -> None:
        Path(path).write_text(
            json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf8"
        )
