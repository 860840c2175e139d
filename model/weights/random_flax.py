"""Flax checkpoints in dalle-mini's exact layout, written from torch weights, for tests and
benchmarks of the conversion (model.weights.convert).

No real checkpoint can be downloaded where tests run, so this writes what dalle-mini's
``save_pretrained`` would have written for the same weights: the parameter tree of
``DalleBart`` (scanned layer stacks ``FlaxBart{Encoder,Decoder}Layers`` with a leading layer
axis, or per-layer ``FlaxBart…Layer_{i}``) and of the VQGAN (``VQModel``, encoder included),
float32, serialized the way ``flax.serialization.to_bytes`` does it (msgpack, arrays as ext type
1, arrays over a size limit chunked), with dalle-mini's config.json, vocab.json and merges.txt.

The mapping here is written from the Flax side, separately from model.weights.convert's, so that a
conversion test checks one against the other rather than a function against itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from model.config import IMAGE_TOKEN_COUNT, ModelConfig
from model.weights.files import WeightPaths, read_state_dict

FLAX_MAX_CHUNK_BYTES = 2**30  # flax.serialization.MAX_CHUNK_SIZE

# our module name → dalle-mini's (auto-named Flax submodules of a layer)
_LAYER_MODULES = {
    "pre_self_attn_layer_norm": "LayerNorm_0",
    "self_attn_layer_norm": "LayerNorm_1",
    "pre_encoder_attn_layer_norm": "LayerNorm_2",
    "encoder_attn_layer_norm": "LayerNorm_3",
    "self_attn": "FlaxBartAttention_0",
    "encoder_attn": "FlaxBartAttention_1",
    "glu": "GLU_0",
}
_GLU_MODULES = {"fc0": "Dense_0", "fc1": "Dense_1", "fc2": "Dense_2", "ln0": "LayerNorm_0"}
_GLU_MODULES["ln1"] = "LayerNorm_1"


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).contiguous().numpy()


def _leaf(module: str, leaf: str, tensor: torch.Tensor) -> tuple[str, np.ndarray]:
    """A torch leaf → Flax's name and value: Dense kernels are (in, out), Conv kernels HWIO."""
    if leaf == "bias":
        return "bias", _numpy(tensor)
    if module.startswith("embed") or module == "embedding":
        return "embedding", _numpy(tensor)
    if tensor.dim() == 2:
        return "kernel", _numpy(tensor.t())
    if tensor.dim() == 4:
        return "kernel", _numpy(tensor.permute(2, 3, 1, 0))
    return "scale", _numpy(tensor)


def _insert(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    if path[-1] in tree:
        raise ValueError(f"{'/'.join(path)} written twice")
    tree[path[-1]] = value


def bart_tree(
    encoder: dict[str, torch.Tensor],
    decoder: dict[str, torch.Tensor],
    layer_count: int,
    scanned: bool = True,
) -> dict[str, Any]:
    """DalleBart's Flax parameter tree for these state dicts (min-dalle's key names)."""
    tree: dict[str, Any] = {}
    for codec, state in (("encoder", encoder), ("decoder", decoder)):
        layers: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
        for key, tensor in state.items():
            *modules, leaf = key.split(".")
            if key == "lm_head.weight":
                _insert(tree, ["lm_head", "kernel"], _numpy(tensor.t()))
                continue
            if modules[0] != "layers":
                name, value = _leaf(modules[-1], leaf, tensor)
                _insert(tree, ["model", codec, *modules, name], value)
                continue
            index, inner = int(modules[1]), modules[2:]
            flax_inner = [_LAYER_MODULES[inner[0]]]
            if inner[0] == "glu":
                flax_inner.append(_GLU_MODULES[inner[1]])
            else:
                flax_inner += inner[1:]
            name, value = _leaf(inner[-1], leaf, tensor)
            if scanned:
                layers.setdefault((*flax_inner, name), {})[index] = value
            else:
                holder = f"FlaxBart{codec.title()}Layer_{index}"
                _insert(tree, ["model", codec, "layers", holder, *flax_inner, name], value)
        for path, by_layer in layers.items():
            holder = f"FlaxBart{codec.title()}Layers"
            stack = np.stack([by_layer[i] for i in range(layer_count)])  # (layers, …)
            _insert(tree, ["model", codec, "layers", holder, *path], stack)
    return tree


def vqgan_tree(detoker: dict[str, torch.Tensor], norms_4d: bool = False) -> dict[str, Any]:
    """The VQGAN's Flax tree (VQModel) for a detoker state dict, with a small stand-in encoder
    and quant_conv (a converter drops them). ``norms_4d`` stores GroupNorm parameters as
    (1, 1, 1, C), as older Flax versions did."""
    generator = torch.Generator().manual_seed(0)
    tree: dict[str, Any] = {
        "encoder": {"conv_in": {"kernel": _numpy(torch.randn(3, 3, 3, 8, generator=generator))}},
        "quant_conv": {"kernel": _numpy(torch.randn(1, 1, 4, 4, generator=generator))},
    }
    tree["quant_conv"]["bias"] = _numpy(torch.zeros(4))
    for key, tensor in detoker.items():
        *modules, leaf = key.split(".")
        if key == "embedding.weight":
            _insert(tree, ["quantize", "embedding", "embedding"], _numpy(tensor))
            continue
        path: list[str] = []
        for module in modules:
            if module.isdigit():
                path[-1] = f"{path[-1]}_{module}"  # up.4 → up_4, block.0 → block_0
            else:
                path.append(module)
        name, value = _leaf(modules[-1], leaf, tensor)
        if norms_4d and "norm" in modules[-1]:
            value = value.reshape(1, 1, 1, -1)
        _insert(tree, [*path, name], value)
    return tree


def _ext_pack(value: Any) -> msgpack.ExtType:
    """flax.serialization._msgpack_ext_pack for numpy arrays: ext type 1, (shape, dtype, bytes)."""
    if isinstance(value, np.ndarray):
        payload = (value.shape, value.dtype.name, value.tobytes("C"))
        return msgpack.ExtType(1, msgpack.packb(payload, use_bin_type=True))
    raise TypeError(f"cannot serialize {type(value)}")


def _chunk_large_arrays(tree: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """flax.serialization._chunk_array_leaves_in_place, on a copy."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out[name] = _chunk_large_arrays(value, max_bytes)
        elif isinstance(value, np.ndarray) and value.nbytes > max_bytes:
            chunk = max(1, max_bytes // value.dtype.itemsize)
            flat = value.reshape(-1)
            chunks = [flat[i : i + chunk] for i in range(0, flat.size, chunk)]
            out[name] = {
                "__msgpack_chunked_array__": True,
                "shape": {str(i): d for i, d in enumerate(value.shape)},
                "chunks": {str(i): c for i, c in enumerate(chunks)},
            }
        else:
            out[name] = value
    return out


def write_msgpack(path: Path, tree: dict[str, Any], max_chunk_bytes: int = FLAX_MAX_CHUNK_BYTES):
    """Serialize a tree as flax.serialization.msgpack_serialize does."""
    data = msgpack.packb(
        _chunk_large_arrays(tree, max_chunk_bytes), default=_ext_pack, strict_types=True
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)


def dalle_mini_config(config: ModelConfig) -> dict[str, Any]:
    """A config.json as dalle-mini writes it (the fields that matter, and a few that do not)."""
    return {
        "architectures": ["eBart"],
        "model_type": "dallebart",
        "d_model": config.embed_count,
        "encoder_layers": config.layer_count,
        "decoder_layers": config.layer_count,
        "encoder_attention_heads": config.attention_head_count,
        "decoder_attention_heads": config.attention_head_count,
        "encoder_ffn_dim": config.glu_embed_count,
        "decoder_ffn_dim": config.glu_embed_count,
        "encoder_vocab_size": config.text_vocab_count,
        "image_vocab_size": config.image_vocab_count,
        "max_text_length": config.text_token_count,
        "image_length": IMAGE_TOKEN_COUNT,
        "ln_type": "layernorm",
        "ln_positions": "normformer",
        "use_glu": True,
        "use_bias": False,
        "force_ln_scale": False,
        "use_scan": True,
        "activation_function": "gelu",
        "dropout": 0.0,
    }


def write_flax_checkpoints(
    source: WeightPaths,
    config: ModelConfig,
    hub_root: Path,
    *,
    scanned: bool = True,
    max_chunk_bytes: int = FLAX_MAX_CHUNK_BYTES,
) -> tuple[Path, Path]:
    """Write the weights under ``source`` (min-dalle's layout) as the hub's Flax checkpoints,
    in ``hub_root/dalle-mini/dalle-{mini,mega}/`` and
    ``hub_root/dalle-mini/vqgan_imagenet_f16_16384/``; return the two folders."""
    bart_dir = Path(hub_root) / "dalle-mini" / f"dalle-{source.model_name}"
    vqgan_dir = Path(hub_root) / "dalle-mini" / "vqgan_imagenet_f16_16384"
    encoder = read_state_dict(source.stage_file("encoder"))
    decoder = read_state_dict(source.stage_file("decoder"))
    tree = bart_tree(encoder, decoder, config.layer_count, scanned=scanned)
    write_msgpack(bart_dir / "flax_model.msgpack", tree, max_chunk_bytes)
    del tree, encoder, decoder
    (bart_dir / "config.json").write_text(json.dumps(dalle_mini_config(config), indent=2))
    shutil.copyfile(source.vocab, bart_dir / "vocab.json")
    shutil.copyfile(source.merges, bart_dir / "merges.txt")

    detoker = read_state_dict(source.stage_file("detoker"))
    write_msgpack(vqgan_dir / "flax_model.msgpack", vqgan_tree(detoker), max_chunk_bytes)
    vqgan_config = {"embed_dim": 256, "n_embed": 16384, "ch": 128, "ch_mult": [1, 1, 2, 2, 4]}
    (vqgan_dir / "config.json").write_text(json.dumps(vqgan_config, indent=2))
    return bart_dir, vqgan_dir
