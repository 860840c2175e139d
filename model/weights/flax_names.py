"""How dalle-mini's Flax checkpoint keys map to our modules' state-dict keys, and back.

The names follow dalle-mini's ``modeling.py`` (Flax) and our modules' ``state_dict()``::

    model/{encoder,decoder}/embed_tokens/embedding     → embed_tokens.weight
      …/embed_positions/embedding, layernorm_embedding, final_ln  → same names
      …/layers/FlaxBart{Encoder,Decoder}Layers/…       → layers.{i}.…   (scanned: a stack with a
                                                          leading layer axis)
      …/layers/FlaxBart{Encoder,Decoder}Layer_{i}/…    → layers.{i}.…   (saved unscanned)
    in a layer: LayerNorm_0/1/2/3  → pre_self_attn_layer_norm, self_attn_layer_norm,
                                     pre_encoder_attn_layer_norm, encoder_attn_layer_norm
                FlaxBartAttention_0/1 → self_attn, encoder_attn
                GLU_0 → glu, and in it Dense_0/1/2 → fc0/1/2, LayerNorm_0/1 → ln0/ln1
    lm_head/kernel                                     → the decoder's lm_head.weight
    leaves: kernel → weight, transposed ((in, out) → (out, in)); scale → weight;
            embedding → weight

    VQGAN: decoder/up_{i}/block_{j}/… → decoder.up.{i}.block.{j}.… (mid's block_1, attn_1,
    block_2 keep their names); conv kernels HWIO → OIHW; quantize/embedding/embedding →
    embedding.weight; the encoder and quant_conv are dropped (only decoding is needed).
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from model.weights.files import Stage
from model.weights.flax import FlaxKey

CheckpointKind = Literal["bart", "vqgan"]

LAYER_NAMES = {
    "LayerNorm_0": "pre_self_attn_layer_norm",
    "LayerNorm_1": "self_attn_layer_norm",
    "LayerNorm_2": "pre_encoder_attn_layer_norm",
    "LayerNorm_3": "encoder_attn_layer_norm",
    "FlaxBartAttention_0": "self_attn",
    "FlaxBartAttention_1": "encoder_attn",
    "GLU_0": "glu",
}
GLU_NAMES = {
    "Dense_0": "fc0",
    "Dense_1": "fc1",
    "Dense_2": "fc2",
    "LayerNorm_0": "ln0",
    "LayerNorm_1": "ln1",
}
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# A tensor's place in our modules: (stage, state-dict key, index into a scanned stack or None).
Place = tuple[Stage, str, int | None]


class Unplaced(Exception):
    """A checkpoint key inside the model's subtrees that has no place in our modules."""


def rename(parts: FlaxKey) -> str:
    """A checkpoint key below a layer (or the model) → our dotted state-dict name."""
    names: list[str] = []
    for part in parts[:-1]:
        table = GLU_NAMES if names and names[-1] == "glu" else LAYER_NAMES
        names.append(table.get(part, part))
    names.append(LEAF_NAMES.get(parts[-1], parts[-1]))
    return ".".join(names)


def bart_places(key: FlaxKey, layer_count: int) -> list[Place] | None:
    """Where a DalleBart checkpoint tensor goes (several places for a scanned stack); None for
    a key outside the model. Raises Unplaced for a key of the model that fits nowhere."""
    if key == ("lm_head", "kernel"):
        return [("decoder", "lm_head.weight", None)]
    if len(key) < 3 or key[0] != "model" or key[1] not in ("encoder", "decoder"):
        return None
    stage: Stage = "encoder" if key[1] == "encoder" else "decoder"
    rest = key[2:]
    if rest[0] != "layers":
        return [(stage, rename(rest), None)]
    if len(rest) < 4:
        raise Unplaced
    holder, inner = rest[1], rest[2:]
    codec = stage.title()
    if holder == f"FlaxBart{codec}Layers":
        return [(stage, f"layers.{i}.{rename(inner)}", i) for i in range(layer_count)]
    match = re.fullmatch(rf"FlaxBart{codec}Layer_(\d+)|(\d+)", holder)
    if match is None:
        raise Unplaced
    return [(stage, f"layers.{int(match[1] or match[2])}.{rename(inner)}", None)]


def vqgan_places(key: FlaxKey) -> list[Place] | None:
    """Where a VQGAN checkpoint tensor goes; [] for the parts we drop, None outside the model."""
    if key[0] in ("encoder", "quant_conv"):
        return []
    if key == ("quantize", "embedding", "embedding"):
        return [("detoker", "embedding.weight", None)]
    if key[0] not in ("decoder", "post_quant_conv"):
        return None
    parts: list[str] = []
    for i, part in enumerate(key[:-1]):
        match = re.fullmatch(r"(up|block|attn)_(\d+)", part)
        if match is not None and key[i - 1 : i] != ("mid",):
            parts += [match[1], match[2]]
        else:
            parts.append(part)
    return [("detoker", ".".join([*parts, LEAF_NAMES.get(key[-1], key[-1])]), None)]


def flax_name(kind: CheckpointKind, stage: Stage, name: str, ndim: int) -> str:
    """The checkpoint key a state-dict key comes from (scanned layout), for messages."""
    *modules, leaf = name.split(".")
    flax_leaf = {"bias": "bias"}.get(leaf) or (
        "embedding"
        if modules[-1].startswith("embed")
        else "kernel"
        if ndim > 1 or modules[-1] == "lm_head"
        else "scale"
    )
    if kind == "vqgan":
        if name == "embedding.weight":
            return "quantize/embedding/embedding"
        path = re.sub(r"\b(up|block|attn)\.(\d+)", r"\1_\2", ".".join(modules))
        return "/".join([*path.split("."), flax_leaf])
    if name == "lm_head.weight":
        return "lm_head/kernel"
    inverse_layer = {ours: theirs for theirs, ours in LAYER_NAMES.items()}
    inverse_glu = {ours: theirs for theirs, ours in GLU_NAMES.items()}
    parts = [f"model/{stage}"]
    if modules[0] == "layers":
        parts.append(f"layers/FlaxBart{stage.title()}Layers")
        modules = modules[2:]
    for i, module in enumerate(modules):
        table = inverse_glu if i and modules[i - 1] == "glu" else inverse_layer
        parts.append(table.get(module, module))
    return "/".join([*parts, flax_leaf])


def converted_shape(shape: tuple[int, ...], leaf: str, target: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 2:
        shape = (shape[1], shape[0])
    elif leaf == "kernel" and len(shape) == 4:
        shape = (shape[3], shape[2], shape[0], shape[1])
    # Old Flax GroupNorms stored their scale and bias as (1, 1, 1, C).
    if len(target) == 1 and len(shape) > 1 and all(d == 1 for d in shape[:-1]):
        shape = shape[-1:]
    return shape


def transform(tensor: torch.Tensor, leaf: str, target: tuple[int, ...]) -> torch.Tensor:
    if leaf == "kernel" and tensor.dim() == 2:
        tensor = tensor.t()  # Dense: (in, out) → (out, in)
    elif leaf == "kernel" and tensor.dim() == 4:
        tensor = tensor.permute(3, 2, 0, 1)  # Conv: HWIO → OIHW
    if tuple(tensor.shape) != target:
        tensor = tensor.reshape(target)
    return tensor
