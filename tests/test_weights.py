"""Strict, code-free loading of weight files (model/weights/files.py), mostly through MinDalle.

Each test damages a private copy of the small random model and checks that loading fails with a
WeightsFormatError whose message names the file (and the key) at fault.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from model import MinDalle, WeightsFormatError
from model.bart import DalleBartDecoder, DalleBartEncoder
from model.weights.files import (
    SCALE_FREE_NORMS,
    WeightPaths,
    is_scale_free_norm_weight,
    load_module,
    read_state_dict,
)
from tests.conftest import SMALL_CONFIG

CPU = torch.device("cpu")
Q_PROJ = "layers.0.self_attn.q_proj.weight"


@pytest.fixture
def paths(small_models_root: Path, tmp_path: Path) -> WeightPaths:
    """A private copy of the small model that a test may damage.

    The BART files are copied; the (large, never damaged) VQGAN folder is linked.
    """
    root = tmp_path / "models"
    shutil.copytree(small_models_root / "dalle_bart_mini", root / "dalle_bart_mini")
    (root / "vqgan").symlink_to(small_models_root / "vqgan", target_is_directory=True)
    return WeightPaths(root, is_mega=False)


def load(paths: WeightPaths) -> MinDalle:
    return MinDalle(paths.models_root, device="cpu", is_mega=False, is_verbose=False)


def error_message(paths: WeightPaths) -> str:
    with pytest.raises(WeightsFormatError) as info:
        load(paths)
    return str(info.value)


def edit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def load_decoder(path: Path, dtype: torch.dtype = torch.float32) -> DalleBartDecoder:
    return load_module(lambda: DalleBartDecoder(SMALL_CONFIG), path, CPU, dtype)


# -- damaged files ------------------------------------------------------------------------------


def test_intact_copy_loads(paths: WeightPaths) -> None:
    """The damage tests below are meaningful only if the undamaged copy loads."""
    model = load(paths)
    assert model.config == SMALL_CONFIG
    assert model.encoder is not None and model.decoder is not None


def test_missing_tensor_names_file_and_key(paths: WeightPaths) -> None:
    state = edit_state_dict(paths.decoder)
    del state[Q_PROJ]
    torch.save(state, paths.decoder)

    message = error_message(paths)
    assert str(paths.decoder) in message
    assert repr(Q_PROJ) in message
    assert "missing" in message


def test_missing_bias_of_scale_free_norm_is_an_error(paths: WeightPaths) -> None:
    """Only the *weight* of a scale-free norm may be absent; its bias must be in the file."""
    state = edit_state_dict(paths.encoder)
    del state["final_ln.bias"]
    torch.save(state, paths.encoder)

    message = error_message(paths)
    assert str(paths.encoder) in message
    assert "'final_ln.bias'" in message


def test_misshapen_tensor_names_key_and_both_shapes(paths: WeightPaths) -> None:
    embed = SMALL_CONFIG.embed_count
    state = edit_state_dict(paths.decoder)
    assert state[Q_PROJ].shape == (embed, embed)
    state[Q_PROJ] = torch.zeros(embed, embed // 2, dtype=torch.float16)
    torch.save(state, paths.decoder)

    message = error_message(paths)
    assert str(paths.decoder) in message
    assert repr(Q_PROJ) in message
    assert f"({embed}, {embed // 2})" in message  # found
    assert f"({embed}, {embed})" in message  # expected


def test_unexpected_tensor_is_named(paths: WeightPaths) -> None:
    extra = "layers.0.self_attn.bogus_proj.weight"
    state = edit_state_dict(paths.encoder)
    state[extra] = torch.zeros(3, dtype=torch.float16)
    torch.save(state, paths.encoder)

    message = error_message(paths)
    assert str(paths.encoder) in message
    assert repr(extra) in message


def test_truncated_file_names_the_file(paths: WeightPaths) -> None:
    data = paths.encoder.read_bytes()
    paths.encoder.write_bytes(data[: len(data) // 2])

    message = error_message(paths)
    assert str(paths.encoder) in message


def test_file_that_is_not_a_state_dict_is_rejected(paths: WeightPaths) -> None:
    torch.save([torch.zeros(2)], paths.encoder)
    message = error_message(paths)
    assert str(paths.encoder) in message


class RunsCode:
    """Unpickling this runs a shell command: what a malicious .pt file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def test_pickle_that_runs_code_is_refused_without_running_it(
    paths: WeightPaths, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    torch.save(
        {"embed_tokens.weight": RunsCode(f"touch {shlex.quote(str(marker))}")}, paths.encoder
    )

    with pytest.raises(WeightsFormatError) as info:
        load(paths)
    assert str(paths.encoder) in str(info.value)
    assert not marker.exists()

    # The file really is an exploit: an unsafe load runs its command.
    torch.load(paths.encoder, weights_only=False)
    assert marker.exists()


# -- scale-free layer norms ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("layers.3.glu.ln0.weight", True),
        ("layers.3.glu.ln1.weight", True),
        ("layers.0.pre_self_attn_layer_norm.weight", True),
        ("layers.0.pre_encoder_attn_layer_norm.weight", True),
        ("final_ln.weight", True),
        ("layers.3.glu.ln0.bias", False),
        ("final_ln.bias", False),
        ("layernorm_embedding.weight", False),
        ("layers.0.self_attn_layer_norm.weight", False),
        ("layers.0.encoder_attn_layer_norm.weight", False),
        ("layers.0.glu.fc0.weight", False),
        ("xfinal_ln.weight", False),  # a suffix match must start at a name boundary
    ],
)
def test_is_scale_free_norm_weight(key: str, expected: bool) -> None:
    assert is_scale_free_norm_weight(key) is expected


def scale_free_keys(module: torch.nn.Module) -> list[str]:
    return [key for key in module.state_dict() if is_scale_free_norm_weight(key)]


def test_absent_scale_free_norm_weights_load_as_ones(paths: WeightPaths) -> None:
    file_keys = set(read_state_dict(paths.decoder))
    decoder = load_decoder(paths.decoder)
    keys = scale_free_keys(decoder)
    # Every kind of scale-free norm occurs in the decoder, and none of them is in the file.
    assert {norm for norm in SCALE_FREE_NORMS if any(norm in key for key in keys)} == set(
        SCALE_FREE_NORMS
    )
    assert file_keys.isdisjoint(keys)
    state = decoder.state_dict()
    for key in keys:
        assert state[key].dtype == torch.float32
        assert torch.equal(state[key], torch.ones_like(state[key])), key
    # Norm weights that the file does hold are not replaced by ones.
    assert not torch.equal(
        state["layernorm_embedding.weight"], torch.ones(SMALL_CONFIG.embed_count)
    )


def test_present_scale_free_norm_weights_are_loaded(paths: WeightPaths) -> None:
    state = edit_state_dict(paths.encoder)
    width = SMALL_CONFIG.embed_count
    state["final_ln.weight"] = torch.full((width,), 0.5, dtype=torch.float16)
    state["layers.1.glu.ln0.weight"] = torch.full((width,), -2.0, dtype=torch.float16)
    torch.save(state, paths.encoder)

    encoder = load(paths).encoder
    assert encoder is not None
    assert torch.equal(encoder.final_ln.weight, torch.full((width,), 0.5))
    ln0 = encoder.get_parameter("layers.1.glu.ln0.weight")
    assert torch.equal(ln0, torch.full((width,), -2.0))
    # The norms left out of the file are still ones.
    assert torch.equal(encoder.get_parameter("layers.0.glu.ln0.weight"), torch.ones(width))


# -- dtype --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_module_converts_float16_file_to_dtype(paths: WeightPaths, dtype: torch.dtype) -> None:
    file_state = read_state_dict(paths.encoder)
    assert {tensor.dtype for tensor in file_state.values()} == {torch.float16}

    encoder = load_module(lambda: DalleBartEncoder(SMALL_CONFIG), paths.encoder, CPU, dtype)
    assert not encoder.training
    state = encoder.state_dict()
    assert {tensor.dtype for tensor in state.values()} == {dtype}
    assert {tensor.device for tensor in state.values()} == {CPU}
    assert set(file_state) < set(state)
    for key, value in file_state.items():
        assert torch.equal(state[key], value.to(dtype)), key
