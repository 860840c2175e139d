"""Where the weight files live, and strict, code-free loading of them.

Layout under models_root (min-dalle's, plus safetensors files and a manifest):
    dalle_bart_mini/ or dalle_bart_mega/   vocab.json, merges.txt, encoder and decoder
                                            (.safetensors or min-dalle's .pt), optionally
                                            config.json (ModelConfig fields), manifest.json
    vqgan/                                  detoker (.safetensors or .pt), manifest.json

When a stage has both files, the .safetensors one is loaded: it is memory-mapped rather than
unpickled. Both are read without running code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from model.errors import WeightsFormatError
from model.weights.tensor_files import SAFETENSORS_SUFFIX, read_header

logger = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=nn.Module)

Stage = Literal["encoder", "decoder", "detoker"]
STAGES: tuple[Stage, ...] = ("encoder", "decoder", "detoker")

# DALL·E Mini/Mega were trained with NormFormer layer norms that have no scale where a dense layer
# follows (dalle-mini's force_ln_scale=False), so the published files have no `.weight` for them.
# Such a norm's weight is exactly 1. Any other missing tensor is an error.
SCALE_FREE_NORMS = (
    "pre_self_attn_layer_norm",
    "pre_encoder_attn_layer_norm",
    "glu.ln0",
    "glu.ln1",
    "final_ln",
)


def is_scale_free_norm_weight(key: str) -> bool:
    return any(
        key == f"{norm}.weight" or key.endswith(f".{norm}.weight") for norm in SCALE_FREE_NORMS
    )


@dataclass(frozen=True)
class WeightPaths:
    models_root: Path
    is_mega: bool

    @property
    def model_name(self) -> str:
        return "mega" if self.is_mega else "mini"

    @property
    def dalle_dir(self) -> Path:
        return Path(self.models_root) / f"dalle_bart_{self.model_name}"

    @property
    def vqgan_dir(self) -> Path:
        return Path(self.models_root) / "vqgan"

    @property
    def vocab(self) -> Path:
        return self.dalle_dir / "vocab.json"

    @property
    def merges(self) -> Path:
        return self.dalle_dir / "merges.txt"

    # encoder, decoder, detoker: the file a stage loads, as `stage_file`: min-dalle's .pt file,
    # or the .safetensors file beside it that takes its place when present.

    @property
    def encoder(self) -> Path:
        return self.stage_file("encoder")

    @property
    def decoder(self) -> Path:
        return self.stage_file("decoder")

    @property
    def config(self) -> Path:
        return self.dalle_dir / "config.json"

    @property
    def detoker(self) -> Path:
        return self.stage_file("detoker")

    def stage_files(self, stage: Stage) -> tuple[Path, Path]:
        """The (.safetensors, .pt) files a stage ("encoder", "decoder", "detoker") can load."""
        folder = self.vqgan_dir if stage == "detoker" else self.dalle_dir
        return folder / f"{stage}{SAFETENSORS_SUFFIX}", folder / f"{stage}.pt"

    def stage_file(self, stage: Stage) -> Path:
        """The file a stage loads: its .safetensors file when there is one, else its .pt file
        (which may not exist yet)."""
        safetensors_file, pt_file = self.stage_files(stage)
        return safetensors_file if safetensors_file.exists() else pt_file

    def has_stage(self, stage: Stage) -> bool:
        return any(path.exists() for path in self.stage_files(stage))

    def model_files(self) -> list[Path]:
        """Every file loading this model reads, as far as they exist."""
        files = [self.vocab, self.merges, self.config]
        files += [self.stage_file(stage) for stage in STAGES]
        return [path for path in files if path.is_file()]


def read_state_dict(path: Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Read a state dict onto `device` without running code: a .safetensors file
    (memory-mapped), or a .pt file with weights_only=True (tensors and plain containers only)."""
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        return read_safetensors(Path(path), device)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, …
        raise WeightsFormatError(
            f"cannot read {path}: {err}. The file is truncated, corrupted, or not a weights-only "
            f"state dict; delete it and download it again."
        ) from err
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in state.items()
    ):
        raise WeightsFormatError(f"{path} does not hold a state dict of named tensors")
    return state


def read_safetensors(path: Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Read a .safetensors file onto `device`; a truncated or corrupted one is a
    WeightsFormatError naming it."""
    from safetensors import SafetensorError, safe_open

    read_header(path)  # names the file, and says "truncated", where safetensors would not
    try:
        where = torch.device(device)
        if where.type == "cuda" and where.index is None:  # safetensors wants "cuda:N"
            where = torch.device("cuda", torch.cuda.current_device())
        with safe_open(str(path), framework="pt", device=str(where)) as file:
            return {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsFormatError(
            f"cannot read {path}: {err}. The file is truncated or corrupted; delete it and "
            "download or convert it again."
        ) from err


def load_module(
    build: Callable[[], ModuleT], path: Path, device: torch.device, dtype: torch.dtype
) -> ModuleT:
    """Build a module without allocating it, fill it from `path`, and move it to device and dtype.

    The tensors are read straight onto `device` (a .safetensors file from its memory map), so
    a GPU worker's weights are not first copied into host memory; the dtype changes there.
    Every parameter must be in the file with its exact shape (except scale-free norm weights,
    which are 1), and the file may hold nothing else.
    """
    with torch.device("meta"):
        module = build()
    expected = module.state_dict()
    state = read_state_dict(path, device)

    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise WeightsFormatError(
            f"{path} has unexpected tensor {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + "; it does not belong to this model. Check is_mega and config.json."
        )
    for key, meta in expected.items():
        if key not in state:
            if not is_scale_free_norm_weight(key):
                raise WeightsFormatError(
                    f"{path} is missing tensor {key!r} (shape {tuple(meta.shape)})"
                )
            state[key] = torch.ones(meta.shape)
        elif state[key].shape != meta.shape:
            raise WeightsFormatError(
                f"{path}: tensor {key!r} has shape {tuple(state[key].shape)}, expected "
                f"{tuple(meta.shape)}. Check is_mega and config.json."
            )
    module.load_state_dict(state, strict=True, assign=True)
    logger.debug("loaded %s", path)
    return module.to(device=device, dtype=dtype).eval()
