"""Convert dalle-mini's original Flax checkpoints to this project's layout, without JAX or Flax.

Input: a checkpoint folder as the Hugging Face hub publishes it: ``flax_model.msgpack``, with
``config.json``, and for DalleBart ``vocab.json`` and ``merges.txt``
(``dalle-mini/dalle-mini``, ``dalle-mini/dalle-mega``, ``dalle-mini/vqgan_imagenet_f16_16384``).
Output: ``encoder.safetensors``, ``decoder.safetensors`` (float16 by default, like min-dalle's
published files), the tokenizer files and ``config.json`` in ``dalle_bart_{mini,mega}/``;
``detoker.safetensors`` (float32) in ``vqgan/``; a manifest in each folder.

How checkpoint keys map to our state-dict keys is in model.weights.flax_names.

Every tensor the model needs must be in the checkpoint (except the weights of scale-free layer
norms, see model.weights.files), with its exact shape, and every tensor of the checkpoint's model
subtrees must have a place; otherwise the conversion stops with an error naming the key.
Sizes come from the checkpoint's config.json. See model.weights.flax for how memory stays bounded.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.bart import DalleBartDecoder, DalleBartEncoder
from model.config import IMAGE_TOKEN_COUNT, ModelConfig
from model.errors import WeightsFormatError
from model.vqgan import VQGanDetokenizer
from model.weights import manifest
from model.weights.files import Stage, WeightPaths, is_scale_free_norm_weight, read_state_dict
from model.weights.flax import FlaxArray, FlaxCheckpoint, FlaxKey, flax_key_name
from model.weights.flax_names import (
    CheckpointKind,
    Place,
    Unplaced,
    bart_places,
    converted_shape,
    flax_name,
    transform,
    vqgan_places,
)
from model.weights.tensor_files import FileRecord, TensorSpec, write_safetensors

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "flax_model.msgpack"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
BART_DTYPE = torch.float16
VQGAN_DTYPE = torch.float32

# dalle-mini config fields whose other values change the computation, with the values DALL·E
# Mini and Mega use (and dalle-mini's defaults, which apply when a field is absent).
ARCHITECTURE = {
    "ln_type": "layernorm",
    "ln_positions": "normformer",
    "use_glu": True,
    "use_bias": False,
    "use_head_scale": False,
    "use_cosine_attention": False,
    "use_swin_position_embeddings": False,
    "use_deepnet_scaling": False,
    "use_alibi": False,
    "use_absolute_position_embeddings": True,
    "use_final_ln_encoder": True,
    "use_final_ln_decoder": True,
    "scale_embedding": False,
    "activation_function": "gelu",
    "sinkhorn_iters": 1,
    "image_length": IMAGE_TOKEN_COUNT,
}
# ModelConfig field ← dalle-mini config field(s); pairs must agree
SIZE_FIELDS = {
    "layer_count": ("encoder_layers", "decoder_layers"),
    "attention_head_count": ("encoder_attention_heads", "decoder_attention_heads"),
    "embed_count": ("d_model",),
    "glu_embed_count": ("encoder_ffn_dim", "decoder_ffn_dim"),
    "text_vocab_count": ("encoder_vocab_size",),
    "image_vocab_count": ("image_vocab_size",),
    "text_token_count": ("max_text_length",),
}


@dataclass(frozen=True)
class _Planned:
    spec: TensorSpec
    source: FlaxArray
    flax_key: FlaxKey
    layer: int | None

    def produce(self) -> torch.Tensor:
        tensor = transform(self.source.read(self.layer), self.flax_key[-1], self.spec.shape)
        return tensor.to(self.spec.dtype).contiguous()


# -- config ---------------------------------------------------------------------------------


def read_flax_config(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError) as err:
        raise WeightsFormatError(f"cannot read {path}: {err}") from err
    if not isinstance(config, dict):
        raise WeightsFormatError(f"{path} does not hold a JSON object")
    return config


def model_config_from_flax(config: dict[str, Any], path: Path) -> ModelConfig:
    """A dalle-mini DalleBart config.json → ModelConfig, refusing architectures we do not run."""
    for name, supported in ARCHITECTURE.items():
        value = config.get(name, supported)
        if value != supported:
            raise WeightsFormatError(
                f"{path}: {name} is {value!r}; dalle-farm runs DALL·E Mini/Mega's architecture, "
                f"which has {name} = {supported!r}"
            )
    sizes = {}
    for field, names in SIZE_FIELDS.items():
        values = {config[name] for name in names if name in config}
        if not values:
            raise WeightsFormatError(f"{path} has no {' or '.join(names)}")
        if len(values) > 1:
            raise WeightsFormatError(
                f"{path}: {' and '.join(names)} differ ({sorted(values)}); dalle-farm needs them "
                "equal"
            )
        sizes[field] = values.pop()
    try:
        return ModelConfig(**sizes)
    except Exception as err:
        raise WeightsFormatError(f"{path}: {err}") from err


def checkpoint_kind(folder: Path) -> CheckpointKind:
    """Whether a checkpoint folder holds DalleBart or the VQGAN (from its config or its keys)."""
    config = read_flax_config(folder) or {}
    if "d_model" in config or config.get("model_type") == "dallebart":
        return "bart"
    if "n_embed" in config or "embed_dim" in config:
        return "vqgan"
    with FlaxCheckpoint(_checkpoint_file(folder)) as checkpoint:
        tops = {key[0] for key in checkpoint.arrays}
    if "model" in tops:
        return "bart"
    if "quantize" in tops:
        return "vqgan"
    raise WeightsFormatError(
        f"{folder / CHECKPOINT_FILE} is neither a DalleBart nor a VQGAN checkpoint (top-level "
        f"keys {sorted(tops)})"
    )


def _plan(
    checkpoint: FlaxCheckpoint,
    kind: CheckpointKind,
    places: Callable[[FlaxKey], list[Place] | None],
    expected: dict[Stage, dict[str, tuple[int, ...]]],
    dtypes: dict[Stage, torch.dtype],
    layer_count: int = 0,
) -> dict[Stage, list[_Planned]]:
    """Match every checkpoint tensor to its place, checking names and shapes, reading no data."""
    found: dict[Stage, dict[str, _Planned]] = {stage: {} for stage in expected}
    ignored = []
    for key, array in checkpoint.arrays.items():
        try:
            targets = places(key)
        except Unplaced:
            targets = [(next(iter(expected)), "", None)]
        if targets is None:
            ignored.append(flax_key_name(key))
            continue
        for stage, name, layer in targets:
            shapes = expected[stage]
            if name not in shapes:
                model = "the VQGAN" if kind == "vqgan" else "DalleBart"
                raise WeightsFormatError(
                    f"{checkpoint.path}: tensor {flax_key_name(key)!r} has no place in {model}"
                    f"{f' (it would be {name!r})' if name else ''}. Is this the right checkpoint "
                    "for its config.json?"
                )
            source_shape = array.shape
            if layer is not None:
                if not array.shape or array.shape[0] != layer_count:
                    raise WeightsFormatError(
                        f"{checkpoint.path}: tensor {flax_key_name(key)!r} stacks "
                        f"{array.shape[:1]} layers, but the config has {layer_count}"
                    )
                source_shape = array.shape[1:]
            target = shapes[name]
            if converted_shape(source_shape, key[-1], target) != target:
                raise WeightsFormatError(
                    f"{checkpoint.path}: tensor {flax_key_name(key)!r} has shape "
                    f"{source_shape}, which does not convert to {name!r} of shape {target}. "
                    "Check the checkpoint's config.json."
                )
            if name in found[stage]:
                other = flax_key_name(found[stage][name].flax_key)
                raise WeightsFormatError(
                    f"{checkpoint.path}: tensors {other!r} and {flax_key_name(key)!r} both "
                    f"hold {name!r}"
                )
            spec = TensorSpec(name, dtypes[stage], target)
            found[stage][name] = _Planned(spec, array, key, layer)
    if ignored:
        log.warning(
            "%s: ignored %d tensor(s) outside the model: %s",
            checkpoint.path,
            len(ignored),
            ", ".join(ignored[:5]),
        )
    for stage, shapes in expected.items():
        for name, shape in shapes.items():
            if name not in found[stage] and not is_scale_free_norm_weight(name):
                source = flax_name(kind, stage, name, len(shape))
                raise WeightsFormatError(
                    f"{checkpoint.path} is missing tensor {source!r} (for {name!r}); the "
                    "checkpoint is incomplete or not a DALL·E Mini/Mega one"
                )
    return {
        stage: [found[stage][name] for name in shapes if name in found[stage]]
        for stage, shapes in expected.items()
    }


# -- conversion -----------------------------------------------------------------------------


def _checkpoint_file(folder: Path) -> Path:
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise WeightsFormatError(f"{folder} has no {CHECKPOINT_FILE}; is it a Flax checkpoint?")
    return path


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _write_stages(
    planned: dict[Stage, list[_Planned]],
    paths: WeightPaths,
    show_progress: bool,
    description: str,
) -> dict[str, FileRecord]:
    total = sum(
        math.prod(item.spec.shape) * item.spec.dtype.itemsize
        for items in planned.values()
        for item in items
    )
    records = {}
    with tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not show_progress,
        file=sys.stderr,
    ) as bar:

        def advance(size: int) -> None:
            bar.update(size)

        for stage, items in planned.items():
            path = paths.stage_files(stage)[0]
            log.info("writing %s (%d tensors)", path, len(items))
            records[path.name] = write_safetensors(
                path,
                [item.spec for item in items],
                _producer(items),
                metadata={"format": "pt"},
                on_bytes=advance,
            )
    return records


def _producer(items: list[_Planned]) -> Callable[[TensorSpec], torch.Tensor]:
    by_name = {item.spec.name: item for item in items}

    def produce(spec: TensorSpec) -> torch.Tensor:
        return by_name[spec.name].produce()

    return produce


def convert_bart(
    folder: Path,
    models_root: Path,
    *,
    is_mega: bool | None = None,
    dtype: torch.dtype = BART_DTYPE,
    show_progress: bool = False,
    source: dict[str, Any] | None = None,
) -> WeightPaths:
    """Convert a DalleBart Flax checkpoint folder into ``models_root``; return its paths.

    Sizes come from the folder's config.json; without one, from the Mini or Mega preset
    (``is_mega``). ``is_mega`` also picks the output folder; by default a checkpoint with Mega's
    sizes goes to dalle_bart_mega/ and any other to dalle_bart_mini/.
    """
    folder = Path(folder)
    flax_config = read_flax_config(folder)
    if flax_config is not None:
        config = model_config_from_flax(flax_config, folder / CONFIG_FILE)
    else:
        config = ModelConfig.preset(bool(is_mega))
        preset = "Mega" if is_mega else "Mini"
        log.warning("%s has no config.json; using the %s sizes", folder, preset)
    if is_mega is None:
        is_mega = config == ModelConfig.mega()
    paths = WeightPaths(Path(models_root), is_mega)
    for name in TOKENIZER_FILES:
        if not (folder / name).is_file():
            raise WeightsFormatError(f"{folder} has no {name}; it comes with the checkpoint")

    with torch.device("meta"):
        expected: dict[Stage, dict[str, tuple[int, ...]]] = {
            "encoder": _shapes(DalleBartEncoder(config)),
            "decoder": _shapes(DalleBartDecoder(config)),
        }
    with FlaxCheckpoint(_checkpoint_file(folder)) as checkpoint:
        planned = _plan(
            checkpoint,
            "bart",
            lambda key: bart_places(key, config.layer_count),
            expected,
            {"encoder": dtype, "decoder": dtype},
            config.layer_count,
        )
        paths.dalle_dir.mkdir(parents=True, exist_ok=True)
        records = _write_stages(planned, paths, show_progress, f"converting {folder.name}")
    for name in TOKENIZER_FILES:
        _copy_atomically(folder / name, paths.dalle_dir / name)
    config.to_json(paths.config)
    manifest.record_folder(
        paths.dalle_dir,
        records,
        {"kind": "flax", "checkpoint": str(folder), "dtype": _dtype_name(dtype), **(source or {})},
    )
    log.info("converted %s to %s", folder, paths.dalle_dir)
    return paths


def convert_vqgan(
    folder: Path,
    models_root: Path,
    *,
    show_progress: bool = False,
    source: dict[str, Any] | None = None,
) -> Path:
    """Convert the VQGAN Flax checkpoint folder into ``models_root``/vqgan; return that folder.

    Stored as float32, as min-dalle's detoker.pt is: the model runs the VQGAN in float32.
    """
    folder = Path(folder)
    paths = WeightPaths(Path(models_root), is_mega=False)
    with torch.device("meta"):
        expected: dict[Stage, dict[str, tuple[int, ...]]] = {"detoker": _shapes(VQGanDetokenizer())}
    with FlaxCheckpoint(_checkpoint_file(folder)) as checkpoint:
        planned = _plan(checkpoint, "vqgan", vqgan_places, expected, {"detoker": VQGAN_DTYPE})
        paths.vqgan_dir.mkdir(parents=True, exist_ok=True)
        records = _write_stages(planned, paths, show_progress, f"converting {folder.name}")
    manifest.record_folder(
        paths.vqgan_dir,
        records,
        {"kind": "flax", "checkpoint": str(folder), "dtype": "float32", **(source or {})},
    )
    log.info("converted %s to %s", folder, paths.vqgan_dir)
    return paths.vqgan_dir


def convert_checkpoint(
    folder: Path,
    models_root: Path,
    *,
    is_mega: bool | None = None,
    dtype: torch.dtype = BART_DTYPE,
    show_progress: bool = False,
    source: dict[str, Any] | None = None,
) -> Path:
    """Convert a DalleBart or VQGAN checkpoint folder, whichever it is; return the output folder."""
    if checkpoint_kind(folder) == "vqgan":
        return convert_vqgan(folder, models_root, show_progress=show_progress, source=source)
    paths = convert_bart(
        folder,
        models_root,
        is_mega=is_mega,
        dtype=dtype,
        show_progress=show_progress,
        source=source,
    )
    return paths.dalle_dir


def pt_to_safetensors(pt_path: Path, safetensors_path: Path) -> FileRecord:
    """Rewrite a min-dalle .pt state dict as a .safetensors file with the same tensors."""
    state = read_state_dict(pt_path)
    specs = [TensorSpec(key, value.dtype, tuple(value.shape)) for key, value in state.items()]
    return write_safetensors(
        safetensors_path, specs, lambda spec: state[spec.name], metadata={"format": "pt"}
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _copy_atomically(source: Path, destination: Path) -> None:
    part = destination.with_name(destination.name + ".part")
    shutil.copyfile(source, part)
    part.replace(destination)
