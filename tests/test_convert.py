"""Converting dalle-mini's Flax checkpoints (model/weights/flax.py, model/weights/convert.py) and
loading the result as safetensors (model/weights/files.py).

The small random model is written twice, as min-dalle's .pt files and as the hub's Flax
checkpoints of the same weights (model/weights/random_flax.py: dalle-mini's parameter tree with
scanned layer stacks, serialized as flax.serialization does). The converted model must give exactly
the images of the .pt files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from model import MinDalle, WeightsFormatError
from model.bart import DalleBartDecoder, DalleBartEncoder
from model.config import ModelConfig
from model.vqgan import VQGanDetokenizer
from model.weights.convert import (
    checkpoint_kind,
    convert_bart,
    convert_checkpoint,
    convert_vqgan,
    model_config_from_flax,
    pt_to_safetensors,
)
from model.weights.files import STAGES, WeightPaths, load_module, read_state_dict
from model.weights.flax import FlaxCheckpoint
from model.weights.random_flax import (
    bart_tree,
    dalle_mini_config,
    vqgan_tree,
    write_msgpack,
)
from model.weights.tensor_files import read_header
from tests.conftest import SMALL_CONFIG

CPU = torch.device("cpu")
TEXT = "a painting of a fox in the snow"
GLU_KEY = "model/decoder/layers/FlaxBartDecoderLayers/GLU_0/Dense_1/kernel"


@pytest.fixture(scope="module")
def bart_checkpoint(flax_hub: Path) -> Path:
    return flax_hub / "dalle-mini" / "dalle-mini"


@pytest.fixture(scope="module")
def vqgan_checkpoint(flax_hub: Path) -> Path:
    return flax_hub / "dalle-mini" / "vqgan_imagenet_f16_16384"


@pytest.fixture(scope="module")
def converted(
    bart_checkpoint: Path, vqgan_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> WeightPaths:
    root = tmp_path_factory.mktemp("converted")
    convert_checkpoint(bart_checkpoint, root)
    convert_checkpoint(vqgan_checkpoint, root)
    return WeightPaths(root, is_mega=False)


def assert_same_tensors(expected: WeightPaths, actual: WeightPaths, stages: Any = STAGES) -> None:
    for stage in stages:
        want = read_state_dict(expected.stage_file(stage))
        got = read_state_dict(actual.stage_file(stage))
        assert sorted(got) == sorted(want), stage
        for key, value in want.items():
            assert got[key].dtype == value.dtype, key
            assert torch.equal(got[key], value), key


def load(models_root: Path) -> MinDalle:
    return MinDalle(models_root, device="cpu", is_mega=False, is_verbose=False)


# -- the converted model equals the original -------------------------------------------------


def test_converted_files_are_safetensors_with_the_original_tensors(
    original: WeightPaths, converted: WeightPaths
) -> None:
    for stage in STAGES:
        assert converted.stage_file(stage).suffix == ".safetensors"
        assert not converted.stage_files(stage)[1].exists()  # no .pt written
    # float16 BART without the scale-free norm weights, float32 VQGAN: as min-dalle's files.
    assert_same_tensors(original, converted)
    assert ModelConfig.from_json(converted.config, ModelConfig.mini()) == SMALL_CONFIG
    for name in ("vocab.json", "merges.txt"):
        assert (converted.dalle_dir / name).read_bytes() == (original.dalle_dir / name).read_bytes()


SETTINGS = {
    "greedy": {"seed": 5, "top_k": 1},
    "sampled": {"seed": 7, "top_k": 256, "temperature": 1.0, "supercondition_factor": 16},
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_converted_model_gives_exactly_the_original_images(
    original: WeightPaths, converted: WeightPaths, settings: dict[str, Any]
) -> None:
    """Whole images for one image (the VQGAN is the slow part on a CPU), and the image tokens of
    a 3×3 grid."""
    want_model, got_model = load(original.models_root), load(converted.models_root)
    want = want_model.generate_images(TEXT, grid_size=1, **settings)
    assert torch.equal(got_model.generate_images(TEXT, grid_size=1, **settings), want)
    assert want.std() > 0  # not a degenerate image that any weights would give

    want_tokens = next(want_model.generate_image_tokens_stream(TEXT, grid_size=3, **settings))
    got_tokens = next(got_model.generate_image_tokens_stream(TEXT, grid_size=3, **settings))
    assert torch.equal(got_tokens, want_tokens)


def test_unscanned_checkpoint_converts_to_the_same_tensors(
    original: WeightPaths, bart_checkpoint: Path, tmp_path: Path
) -> None:
    """A checkpoint saved without nn.scan has per-layer keys FlaxBart…Layer_{i}."""
    folder = tmp_path / "unscanned"
    shutil.copytree(bart_checkpoint, folder, ignore=shutil.ignore_patterns("*.msgpack"))
    tree = bart_tree(
        read_state_dict(original.encoder),
        read_state_dict(original.decoder),
        SMALL_CONFIG.layer_count,
        scanned=False,
    )
    assert "FlaxBartEncoderLayer_1" in tree["model"]["encoder"]["layers"]
    write_msgpack(folder / "flax_model.msgpack", tree)
    out = convert_bart(folder, tmp_path / "out")
    assert_same_tensors(original, out, ("encoder", "decoder"))


def test_chunked_arrays_convert_to_the_same_tensors(
    original: WeightPaths, bart_checkpoint: Path, tmp_path: Path
) -> None:
    """flax splits arrays over 2**30 bytes into chunks; a small limit makes every array chunked
    here, with chunk borders inside layers."""
    folder = tmp_path / "chunked"
    shutil.copytree(bart_checkpoint, folder, ignore=shutil.ignore_patterns("*.msgpack"))
    tree = bart_tree(
        read_state_dict(original.encoder),
        read_state_dict(original.decoder),
        SMALL_CONFIG.layer_count,
    )
    write_msgpack(folder / "flax_model.msgpack", tree, max_chunk_bytes=1000)
    with FlaxCheckpoint(folder / "flax_model.msgpack") as checkpoint:
        stack = checkpoint.arrays[tuple(GLU_KEY.split("/"))]
        assert len(stack._segments) > SMALL_CONFIG.layer_count
    out = convert_bart(folder, tmp_path / "out")
    assert_same_tensors(original, out, ("encoder", "decoder"))


def test_old_flax_group_norm_shapes_are_accepted(
    original: WeightPaths, vqgan_checkpoint: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "vqgan"
    shutil.copytree(vqgan_checkpoint, folder, ignore=shutil.ignore_patterns("*.msgpack"))
    tree = vqgan_tree(read_state_dict(original.detoker), norms_4d=True)
    assert tree["decoder"]["norm_out"]["scale"].shape == (1, 1, 1, 128)
    write_msgpack(folder / "flax_model.msgpack", tree)
    convert_vqgan(folder, tmp_path / "out")
    assert_same_tensors(original, WeightPaths(tmp_path / "out", False), ("detoker",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_option(
    original: WeightPaths, bart_checkpoint: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    out = convert_bart(bart_checkpoint, tmp_path, dtype=dtype)
    want = read_state_dict(original.decoder)
    got = read_state_dict(out.stage_file("decoder"))
    for key, value in want.items():
        assert got[key].dtype == dtype
        assert torch.equal(got[key], value.to(dtype)), key


def test_checkpoint_kind(bart_checkpoint: Path, vqgan_checkpoint: Path, tmp_path: Path) -> None:
    assert checkpoint_kind(bart_checkpoint) == "bart"
    assert checkpoint_kind(vqgan_checkpoint) == "vqgan"
    # Without config.json, from the top-level keys.
    for folder in (bart_checkpoint, vqgan_checkpoint):
        copy = tmp_path / folder.name
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("config.json"))
        assert checkpoint_kind(copy) == checkpoint_kind(folder)


# -- sizes come from config.json ------------------------------------------------------------


@pytest.mark.parametrize("config", [ModelConfig.mini(), ModelConfig.mega(), SMALL_CONFIG])
def test_config_json_gives_the_sizes(config: ModelConfig) -> None:
    assert model_config_from_flax(dalle_mini_config(config), Path("config.json")) == config


def test_mega_sized_checkpoint_installs_as_mega(bart_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "dalle-mega"
    shutil.copytree(bart_checkpoint, folder)
    out = convert_bart(folder, tmp_path / "out", is_mega=True)
    assert out.dalle_dir == tmp_path / "out" / "dalle_bart_mega"
    assert ModelConfig.from_json(out.config, ModelConfig.mega()) == SMALL_CONFIG


@pytest.mark.parametrize(
    ("field", "value"),
    [("ln_positions", "swinv2"), ("use_glu", False), ("use_head_scale", True), ("use_bias", True)],
)
def test_other_architectures_are_refused_naming_the_field(field: str, value: object) -> None:
    config = {**dalle_mini_config(SMALL_CONFIG), field: value}
    with pytest.raises(WeightsFormatError, match=field):
        model_config_from_flax(config, Path("config.json"))


def test_unequal_encoder_and_decoder_sizes_are_refused() -> None:
    config = {**dalle_mini_config(SMALL_CONFIG), "decoder_layers": 3}
    with pytest.raises(WeightsFormatError, match="decoder_layers"):
        model_config_from_flax(config, Path("config.json"))


# -- refused checkpoints --------------------------------------------------------------------


def edited_checkpoint(original: WeightPaths, source: Path, folder: Path, edit: Any) -> Path:
    """A copy of the BART checkpoint folder whose tree went through ``edit(tree)``."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.msgpack"))
    tree = bart_tree(
        read_state_dict(original.encoder),
        read_state_dict(original.decoder),
        SMALL_CONFIG.layer_count,
    )
    edit(tree)
    write_msgpack(folder / "flax_model.msgpack", tree)
    return folder


def subtree(tree: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    *parents, leaf = key.split("/")
    for name in parents:
        tree = tree[name]
    return tree, leaf


def test_missing_tensor_is_refused_naming_the_key(
    original: WeightPaths, bart_checkpoint: Path, tmp_path: Path
) -> None:
    def drop(tree: dict[str, Any]) -> None:
        parent, leaf = subtree(tree, GLU_KEY)
        del parent[leaf]

    folder = edited_checkpoint(original, bart_checkpoint, tmp_path / "ckpt", drop)
    with pytest.raises(WeightsFormatError) as info:
        convert_bart(folder, tmp_path / "out")
    message = str(info.value)
    assert repr(GLU_KEY) in message
    assert "missing" in message
    assert str(folder / "flax_model.msgpack") in message
    # Refused before anything was written.
    assert not (tmp_path / "out" / "dalle_bart_mini").exists()


def test_missing_lm_head_is_refused_naming_it(
    original: WeightPaths, bart_checkpoint: Path, tmp_path: Path
) -> None:
    folder = edited_checkpoint(
        original, bart_checkpoint, tmp_path / "ckpt", lambda tree: tree.pop("lm_head")
    )
    with pytest.raises(WeightsFormatError, match="'lm_head/kernel'"):
        convert_bart(folder, tmp_path / "out")


def test_tensor_without_a_place_is_refused_naming_it(
    original: WeightPaths, bart_checkpoint: Path, tmp_path: Path
) -> None:
    extra = "model/encoder/layers/FlaxBartEncoderLayers/LayerNorm_2/bias"

    def add(tree: dict[str, Any]) -> None:
        parent, _ = subtree(tree, "model/encoder/layers/FlaxBartEncoderLayers/x")
        parent["LayerNorm_2"] = {"bias": np.zeros((SMALL_CONFIG.layer_count, 64), np.float32)}

    folder = edited_checkpoint(original, bart_checkpoint, tmp_path / "ckpt", add)
    with pytest.raises(WeightsFormatError, match=repr(extra)):
        convert_bart(folder, tmp_path / "out")


def test_wrong_shape_is_refused_naming_the_key(
    original: WeightPaths, bart_checkpoint: Path, tmp_path: Path
) -> None:
    def shrink(tree: dict[str, Any]) -> None:
        parent, leaf = subtree(tree, GLU_KEY)
        parent[leaf] = parent[leaf][:, :, :10]

    folder = edited_checkpoint(original, bart_checkpoint, tmp_path / "ckpt", shrink)
    with pytest.raises(WeightsFormatError, match=repr(GLU_KEY)):
        convert_bart(folder, tmp_path / "out")


def test_stack_of_the_wrong_layer_count_is_refused(
    original: WeightPaths, bart_checkpoint: Path, tmp_path: Path
) -> None:
    def drop_layer(tree: dict[str, Any]) -> None:
        parent, leaf = subtree(tree, GLU_KEY)
        parent[leaf] = parent[leaf][:1]

    folder = edited_checkpoint(original, bart_checkpoint, tmp_path / "ckpt", drop_layer)
    with pytest.raises(WeightsFormatError, match=repr(GLU_KEY)):
        convert_bart(folder, tmp_path / "out")


def test_truncated_checkpoint_is_refused_naming_the_file(
    bart_checkpoint: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(bart_checkpoint, folder)
    checkpoint = folder / "flax_model.msgpack"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(WeightsFormatError) as info:
        convert_bart(folder, tmp_path / "out")
    assert str(checkpoint) in str(info.value)
    assert "truncated" in str(info.value)


def test_folder_without_tokenizer_is_refused(bart_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(bart_checkpoint, folder, ignore=shutil.ignore_patterns("merges.txt"))
    with pytest.raises(WeightsFormatError, match=r"merges\.txt"):
        convert_bart(folder, tmp_path / "out")


# -- the msgpack reader against msgpack itself ----------------------------------------------


def flax_restore(data: bytes) -> Any:
    """flax.serialization.msgpack_restore, for numpy dtypes: the reference decoder."""

    def ext_hook(code: int, payload: bytes) -> Any:
        shape, dtype, buffer = msgpack.unpackb(payload, raw=True)
        array = np.frombuffer(buffer, dtype=np.dtype(dtype.decode())).reshape(shape)
        return array if code == 1 else array[()]

    def unchunk(tree: Any) -> Any:
        if not isinstance(tree, dict):
            return tree
        if "__msgpack_chunked_array__" in tree:
            shape = [tree["shape"][str(i)] for i in range(len(tree["shape"]))]
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {name: unchunk(value) for name, value in tree.items()}

    return unchunk(msgpack.unpackb(data, ext_hook=ext_hook, raw=False))


@pytest.mark.parametrize("max_chunk_bytes", [2**30, 64])
def test_reader_agrees_with_msgpack_on_every_encoding(tmp_path: Path, max_chunk_bytes: int) -> None:
    rng = np.random.default_rng(0)
    tree = {
        # a long key (str8), many keys (map16), and arrays of assorted sizes, so that msgpack
        # picks fixext, ext8, ext16 and ext32, and bin8, bin16 and bin32
        "k" * 40: {f"p{i}": rng.standard_normal(i).astype(np.float32) for i in range(20)},
        "sizes": {
            "scalar": np.array(1.5, dtype=np.float32),
            "one": np.ones(1, np.float16),
            "big": rng.standard_normal((300, 70)).astype(np.float32),
            "ints": np.arange(-5, 300, dtype=np.int64).reshape(5, 61),
            "wide": rng.standard_normal((2, 40000)).astype(np.float16),
        },
        "chunked": rng.standard_normal((3, 7, 5)).astype(np.float32),
    }
    path = tmp_path / "tree.msgpack"
    write_msgpack(path, tree, max_chunk_bytes)
    reference = flax_restore(path.read_bytes())
    with FlaxCheckpoint(path) as checkpoint:
        assert len(checkpoint.arrays) == 26
        for key, array in checkpoint.arrays.items():
            want = reference
            for name in key:
                want = want[name]
            got = array.read()
            assert got.shape == want.shape, key
            assert np.array_equal(got.numpy(), want), key
            if want.ndim:
                for i in range(want.shape[0]):
                    assert np.array_equal(array.read(i).numpy(), want[i]), (key, i)


def test_reader_reads_bfloat16(tmp_path: Path) -> None:
    values = torch.randn(4, 3).to(torch.bfloat16)
    raw = values.view(torch.uint16).numpy().tobytes()
    payload = msgpack.packb(((4, 3), "bfloat16", raw), use_bin_type=True)
    path = tmp_path / "bf16.msgpack"
    path.write_bytes(msgpack.packb({"w": msgpack.ExtType(1, payload)}))
    with FlaxCheckpoint(path) as checkpoint:
        assert torch.equal(checkpoint.arrays[("w",)].read(), values)


@pytest.mark.parametrize("data", [b"", b"\x81\xa1a", b"\x81\xa1a\xc7\xff\x01", b"not msgpack"])
def test_reader_refuses_broken_files_naming_them(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(data)
    with pytest.raises(WeightsFormatError, match=str(path)):
        FlaxCheckpoint(path)


# -- safetensors loading --------------------------------------------------------------------


@pytest.fixture
def with_safetensors(original: WeightPaths, tmp_path: Path) -> WeightPaths:
    """A copy of the original with every .pt file also written as .safetensors."""
    root = tmp_path / "models"
    shutil.copytree(original.models_root, root)
    paths = WeightPaths(root, is_mega=False)
    for stage in STAGES:
        safetensors_file, pt_file = paths.stage_files(stage)
        pt_to_safetensors(pt_file, safetensors_file)
    return paths


def test_safetensors_loading_equals_pt_loading(with_safetensors: WeightPaths) -> None:
    builds = {
        "encoder": lambda: DalleBartEncoder(SMALL_CONFIG),
        "decoder": lambda: DalleBartDecoder(SMALL_CONFIG),
        "detoker": VQGanDetokenizer,
    }
    for stage, build in builds.items():
        safetensors_file, pt_file = with_safetensors.stage_files(stage)  # type: ignore[arg-type]
        for dtype in (torch.float32, torch.float16):
            from_pt = load_module(build, pt_file, CPU, dtype).state_dict()
            from_st = load_module(build, safetensors_file, CPU, dtype).state_dict()
            assert from_pt.keys() == from_st.keys()
            assert all(torch.equal(from_pt[key], from_st[key]) for key in from_pt)
        assert read_header(safetensors_file)["__metadata__"] == {"format": "pt"}


def test_safetensors_is_preferred_and_renders_the_same_images(
    original: WeightPaths, with_safetensors: WeightPaths
) -> None:
    for stage in STAGES:
        assert with_safetensors.stage_file(stage).suffix == ".safetensors"
        with_safetensors.stage_files(stage)[1].unlink()  # prove the .pt files are not read
    settings = {"seed": 11, "top_k": 128, "grid_size": 1}
    want = load(original.models_root).generate_images(TEXT, **settings)
    assert torch.equal(load(with_safetensors.models_root).generate_images(TEXT, **settings), want)


def _load_decoder(path: Path) -> DalleBartDecoder:
    return load_module(lambda: DalleBartDecoder(SMALL_CONFIG), path, CPU, torch.float32)


def test_truncated_safetensors_fails_loading_naming_the_file(
    with_safetensors: WeightPaths,
) -> None:
    path = with_safetensors.stage_files("decoder")[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsFormatError) as info:
        _load_decoder(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value)


def test_corrupted_safetensors_header_fails_loading_naming_the_file(
    with_safetensors: WeightPaths,
) -> None:
    path = with_safetensors.stage_files("decoder")[0]
    data = bytearray(path.read_bytes())
    data[20:30] = b"\x00" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsFormatError, match=str(path)):
        _load_decoder(path)


def test_safetensors_missing_and_unexpected_keys_are_named(
    with_safetensors: WeightPaths, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    path = with_safetensors.stage_files("decoder")[0]
    state = read_state_dict(path)
    q_proj = "layers.0.self_attn.q_proj.weight"
    del state[q_proj]
    save_file(state, str(path))
    with pytest.raises(WeightsFormatError, match=repr(q_proj)) as info:
        _load_decoder(path)
    assert str(path) in str(info.value)

    state = read_state_dict(with_safetensors.stage_files("encoder")[0])
    state["bogus.weight"] = torch.zeros(2, dtype=torch.float16)
    save_file(state, str(path))
    with pytest.raises(WeightsFormatError, match=r"'bogus\.weight'"):
        load_module(lambda: DalleBartEncoder(SMALL_CONFIG), path, CPU, torch.float32)


def test_manifest_is_written_beside_converted_weights(converted: WeightPaths) -> None:
    for folder in (converted.dalle_dir, converted.vqgan_dir):
        document = json.loads((folder / "manifest.json").read_text())
        assert document["source"]["kind"] == "flax"
        names = set(document["files"])
        assert names == {p.name for p in folder.iterdir() if p.name != "manifest.json"}
