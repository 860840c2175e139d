"""Behaviour of MinDalle, ModelConfig and the tokenizer beyond parity with min-dalle.

Generations use the small random model; every VQGAN decode costs about a second per 256×256
image, so images are generated sparingly (module fixtures share them) and tokens alone are
generated wherever no image is needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from model import ConfigError, MinDalle, ModelConfig, WeightsFormatError, bart
from model.bart import DecoderLayer, KVCache
from model.tokenizer import PAD_TOKEN_ID, TextTokenizer, text_tokens
from tests.conftest import SMALL_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT = "a painting of a fox in the snow"
SEED = 5


def new_model(root: Path, **kwargs: Any) -> MinDalle:
    kwargs = {"device": "cpu", "is_mega": False, "is_verbose": False, **kwargs}
    return MinDalle(root, **kwargs)


def tokens(model: MinDalle, seed: int = SEED, text: str = TEXT, **kwargs: Any) -> torch.Tensor:
    return next(model.generate_image_tokens_stream(text, seed, 1, **kwargs))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.fixture(scope="module")
def model(small_models_root: Path) -> MinDalle:
    return new_model(small_models_root)


@pytest.fixture(scope="module")
def image(model: MinDalle) -> Image.Image:
    """The reusable model's image for TEXT and SEED, generated once for the tests to compare."""
    return model.generate_image(TEXT, SEED, 1)


def assert_stages_released(model: MinDalle) -> None:
    assert model.encoder is None
    assert model.decoder is None
    assert model.detokenizer is None


# -- ModelConfig --------------------------------------------------------------------------------


def test_presets_have_min_dalle_sizes() -> None:
    assert dataclasses.astuple(ModelConfig.mini()) == (12, 16, 1024, 2730, 50264, 16384, 64)
    assert dataclasses.astuple(ModelConfig.mega()) == (24, 32, 2048, 4096, 50272, 16415, 64)
    assert ModelConfig.preset(is_mega=False) == ModelConfig.mini()
    assert ModelConfig.preset(is_mega=True) == ModelConfig.mega()
    assert ModelConfig.mini().head_dim == 64


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("layer_count", 0, "layer_count"),
        ("embed_count", -64, "embed_count"),
        ("glu_embed_count", -1, "glu_embed_count"),
        ("text_token_count", 0, "text_token_count"),
        ("attention_head_count", True, "attention_head_count"),
        ("layer_count", 2.0, "layer_count"),
        ("text_vocab_count", "512", "text_vocab_count"),
        ("attention_head_count", 3, "attention_head_count"),  # 3 does not divide 64
        ("image_vocab_count", 16383, "image_vocab_count"),
    ],
)
def test_invalid_config_values_raise_config_error(field: str, value: Any, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        dataclasses.replace(SMALL_CONFIG, **{field: value})


def test_from_json_overrides_only_given_fields(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"layer_count": 3, "text_token_count": 32}), encoding="utf8")
    assert ModelConfig.from_json(path, ModelConfig.mega()) == dataclasses.replace(
        ModelConfig.mega(), layer_count=3, text_token_count=32
    )
    path.write_text("{}", encoding="utf8")
    assert ModelConfig.from_json(path, SMALL_CONFIG) == SMALL_CONFIG


def test_to_json_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    SMALL_CONFIG.to_json(path)
    assert ModelConfig.from_json(path, ModelConfig.mega()) == SMALL_CONFIG


def test_from_json_unknown_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"layer_count": 3, "num_layers": 3}), encoding="utf8")
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_json(path, ModelConfig.mini())
    assert "num_layers" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    ['{"layer_count": 3', "", "[12, 16]", '"mini"'],
    ids=["truncated", "empty", "list", "string"],
)
def test_from_json_malformed_file_is_named(tmp_path: Path, content: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content, encoding="utf8")
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_json(path, ModelConfig.mini())
    assert str(path) in str(info.value)


def test_from_json_invalid_value_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"layer_count": 0}), encoding="utf8")
    with pytest.raises(ConfigError, match="layer_count"):
        ModelConfig.from_json(path, ModelConfig.mini())


def test_from_json_missing_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_json(path, ModelConfig.mini())
    assert str(path) in str(info.value)


# -- config precedence in MinDalle ----------------------------------------------------------------


@pytest.fixture
def tokenizer_only_root(small_models_root: Path, tmp_path: Path) -> Path:
    """A models root holding only vocab.json and merges.txt (no config.json) for mini and mega.

    With is_reusable=False, MinDalle reads nothing else on construction.
    """
    for name in ("mini", "mega"):
        directory = tmp_path / f"dalle_bart_{name}"
        directory.mkdir()
        for file in ("vocab.json", "merges.txt"):
            shutil.copy(small_models_root / "dalle_bart_mini" / file, directory / file)
    return tmp_path


def test_config_json_beside_weights_wins_over_preset(model: MinDalle) -> None:
    assert model.config == SMALL_CONFIG
    assert model.config != ModelConfig.mini()


@pytest.mark.parametrize("is_mega", [False, True])
def test_preset_applies_without_config_json(tokenizer_only_root: Path, is_mega: bool) -> None:
    lean = new_model(tokenizer_only_root, is_mega=is_mega, is_reusable=False)
    assert lean.config == ModelConfig.preset(is_mega)


def test_partial_config_json_is_merged_with_preset(tokenizer_only_root: Path) -> None:
    (tokenizer_only_root / "dalle_bart_mega" / "config.json").write_text(
        json.dumps({"layer_count": 2}), encoding="utf8"
    )
    lean = new_model(tokenizer_only_root, is_mega=True, is_reusable=False)
    assert lean.config == dataclasses.replace(ModelConfig.mega(), layer_count=2)


def test_malformed_config_json_beside_weights_raises_config_error(
    tokenizer_only_root: Path,
) -> None:
    path = tokenizer_only_root / "dalle_bart_mini" / "config.json"
    path.write_text("{not json", encoding="utf8")
    with pytest.raises(ConfigError) as info:
        new_model(tokenizer_only_root, is_reusable=False)
    assert str(path) in str(info.value)


def test_explicit_config_wins_over_config_json(small_models_root: Path, model: MinDalle) -> None:
    # The head count changes no parameter shape, so these weights load under either config,
    # but attention differs, and so do the sampled tokens.
    eight_heads = dataclasses.replace(SMALL_CONFIG, attention_head_count=8)
    explicit = new_model(small_models_root, config=eight_heads, is_reusable=False)
    assert explicit.config == eight_heads
    assert not torch.equal(tokens(explicit), tokens(model))


def test_mismatching_explicit_config_fails_with_shape_error(small_models_root: Path) -> None:
    with pytest.raises(WeightsFormatError) as info:
        new_model(small_models_root, config=ModelConfig.mini())
    message = str(info.value)
    assert "encoder.pt" in message
    assert "'embed_tokens.weight'" in message
    assert "(512, 64)" in message  # in the file
    assert "(50264, 1024)" in message  # expected by the Mini config


# -- is_reusable=False --------------------------------------------------------------------------


def test_not_reusable_generates_the_same_image_and_releases_stages(
    small_models_root: Path, image: Image.Image
) -> None:
    lean = new_model(small_models_root, is_reusable=False)
    assert_stages_released(lean)
    lean_image = lean.generate_image(TEXT, SEED, 1)
    assert np.array_equal(pixels(lean_image), pixels(image))
    assert_stages_released(lean)


def test_not_reusable_progressive_stream(small_models_root: Path, image: Image.Image) -> None:
    lean = new_model(small_models_root, is_reusable=False)
    frames = list(lean.generate_image_stream(TEXT, SEED, 1, progressive_outputs=True))
    assert len(frames) == 8
    assert all(frame.size == (256, 256) for frame in frames)
    assert np.array_equal(pixels(frames[-1]), pixels(image))
    assert not np.array_equal(pixels(frames[0]), pixels(image))  # frames do progress
    assert_stages_released(lean)


# -- seeds --------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_image(model: MinDalle, image: Image.Image) -> None:
    again = model.generate_image(TEXT, SEED, 1)
    assert np.array_equal(pixels(again), pixels(image))
    assert pixels(image).std() > 0  # a real image, not a constant one


def test_other_seed_gives_other_tokens(model: MinDalle) -> None:
    assert not torch.equal(tokens(model, SEED), tokens(model, SEED + 1))


@pytest.mark.parametrize("seed", [-1, 0])
def test_seed_not_positive_is_random(model: MinDalle, seed: int) -> None:
    first, second = tokens(model, seed, top_k=256), tokens(model, seed, top_k=256)
    assert first.shape == (1, 256)
    assert not torch.equal(first, second)


# -- generate_images ----------------------------------------------------------------------------


def test_generate_images_tiles_the_grid_in_min_dalle_layout(model: MinDalle) -> None:
    grid_size, side = 2, 256
    kwargs = dict(text="an astronaut riding a horse", seed=21, grid_size=grid_size)
    images = model.generate_images(**kwargs)
    grid = pixels(model.generate_image(**kwargs))

    assert images.shape == (grid_size**2, side, side, 3)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 255
    assert grid.shape == (grid_size * side, grid_size * side, 3)
    as_uint8 = images.to(torch.uint8).numpy()
    for a in range(grid_size):
        for b in range(grid_size):
            tile = grid[b * side : (b + 1) * side, a * side : (a + 1) * side]
            assert np.array_equal(as_uint8[a * grid_size + b], tile), (a, b)
    # The images differ, so a wrong layout could not pass.
    for i in range(len(images)):
        for j in range(i):
            assert not torch.equal(images[i], images[j])


# -- on_step ------------------------------------------------------------------------------------


def test_on_step_reports_every_token_in_order(model: MinDalle) -> None:
    steps: list[tuple[int, int]] = []
    tokens(model, on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(step, 256) for step in range(1, 257)]


class Cancelled(Exception):
    pass


def cancel_at(step_to_cancel: int, steps: list[int]) -> Any:
    def on_step(step: int, total: int) -> None:
        steps.append(step)
        if step == step_to_cancel:
            raise Cancelled

    return on_step


def test_exception_from_on_step_stops_generation(model: MinDalle) -> None:
    steps: list[int] = []
    with pytest.raises(Cancelled):
        model.generate_image(TEXT, SEED, 1, on_step=cancel_at(10, steps))
    assert steps == list(range(1, 11))
    # A cancelled generation leaves the model usable, with unchanged results.
    assert torch.equal(tokens(model), tokens(model))


def test_cancelled_not_reusable_model_releases_stages(small_models_root: Path) -> None:
    lean = new_model(small_models_root, is_reusable=False)
    steps: list[int] = []
    with pytest.raises(Cancelled):
        lean.generate_image(TEXT, SEED, 1, on_step=cancel_at(3, steps))
    assert steps == [1, 2, 3]
    assert_stages_released(lean)


# -- sampling settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("top_k", 0),
        ("top_k", 16385),
        ("temperature", 0),
        ("temperature", -1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("supercondition_factor", math.nan),
        ("supercondition_factor", math.inf),
        ("grid_size", 0),
        ("grid_size", -1),
    ],
)
def test_invalid_sampling_settings_raise_value_error(
    small_models_root: Path, setting: str, value: float
) -> None:
    lean = new_model(small_models_root, is_reusable=False)
    kwargs: dict[str, Any] = {"text": TEXT, "seed": SEED, "grid_size": 1, setting: value}
    with pytest.raises(ValueError, match=setting):
        lean.generate_image(**kwargs)
    assert_stages_released(lean)  # refused before loading any weights


def test_extreme_valid_sampling_settings_are_accepted(model: MinDalle) -> None:
    greedy = tokens(model, top_k=1)
    assert torch.equal(greedy, tokens(model, SEED + 1, top_k=1))  # top_k=1 ignores the seed
    full = tokens(model, top_k=16384, temperature=0.5, supercondition_factor=-3)
    assert full.shape == (1, 256)


# -- dtype --------------------------------------------------------------------------------------


def test_bfloat16_model(small_models_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bf16 = new_model(small_models_root, dtype=torch.bfloat16)
    assert bf16.encoder is not None and bf16.decoder is not None and bf16.detokenizer is not None
    layer = cast(DecoderLayer, bf16.decoder.layers[0])
    assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.detokenizer.parameters()} == {torch.float32}

    caches: list[KVCache] = []
    new_caches = bf16.decoder.new_caches

    def spy(*args: Any, **kwargs: Any) -> list[KVCache]:
        result = new_caches(*args, **kwargs)
        caches.extend(result)
        return result

    monkeypatch.setattr(bf16.decoder, "new_caches", spy)
    image_tokens = tokens(bf16)
    assert image_tokens.shape == (1, 256) and image_tokens.dtype == torch.long
    assert int(image_tokens.min()) >= 0 and int(image_tokens.max()) < 2**14
    assert len(caches) == SMALL_CONFIG.layer_count
    assert {cache.keys.dtype for cache in caches} == {torch.bfloat16}
    assert {cache.values.dtype for cache in caches} == {torch.bfloat16}


# -- matrix products ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 3, 16, 64, 65])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mkl"])
def test_every_linear_path_computes_the_product(
    monkeypatch: pytest.MonkeyPatch, rows: int, onednn: bool
) -> None:
    """bart.linear's CPU paths (oneDNN for few rows, MKL by blocks without it, plain F.linear
    beyond 64 rows) all give x @ weight.T."""
    calls = []
    if onednn:
        onednn_linear = bart._onednn_linear
        if onednn_linear is None:
            pytest.skip("this torch build has no oneDNN")

        def spy(*args: Any) -> torch.Tensor:
            calls.append(args[0].shape)
            return onednn_linear(*args)

        monkeypatch.setattr(bart, "_onednn_linear", spy)
    else:
        monkeypatch.setattr(bart, "_onednn_linear", None)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 96, generator=generator)
    weight = torch.randn(600, 96, generator=generator)  # 600 outputs: MKL blocks of 256, 256, 88
    out = bart.linear(x, weight)
    assert out.shape == (rows, 1, 600)
    expected = (x.double() @ weight.double().T).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert len(calls) == (1 if onednn and rows <= bart.CPU_FEW_ROWS else 0)


# -- torch-free API imports ---------------------------------------------------------------------


def test_config_and_tokenizer_import_without_torch() -> None:
    script = (
        "import sys\n"
        "import model.tokenizer, model.config\n"
        "import model\n"
        "model.ModelConfig.mini()\n"
        "assert 'torch' not in sys.modules, 'torch imported too early'\n"
        "from model import MinDalle\n"
        "assert 'torch' in sys.modules, 'MinDalle did not import torch'\n"
        "assert MinDalle.__module__ == 'model.min_dalle'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# -- tokenizer ----------------------------------------------------------------------------------


def test_text_tokens_short_text_is_padded() -> None:
    rows = text_tokens([0, 40, 52, 2], 64)
    assert PAD_TOKEN_ID == 1
    assert rows == [[0, 2] + [1] * 62, [0, 40, 52, 2] + [1] * 60]


def test_text_tokens_long_text_is_cut() -> None:
    long = list(range(100, 170))  # 70 tokens
    rows = text_tokens(long, 64)
    assert rows == [[100, 163] + [1] * 62, list(range(100, 164))]


def test_text_tokens_other_length() -> None:
    assert text_tokens([0, 7, 2], 4) == [[0, 2, 1, 1], [0, 7, 2, 1]]


def test_tokenize_small_vocab(model: MinDalle) -> None:
    # Ids in the small vocab: <s> 0, <pad> 1, </s> 2, <unk> 3, "Ġ" 4, then the alphabet
    # "abc…z.,!?'-:_&" (5 + index), then "Ġ" + each letter (40 + index). "Ġa" is the first merge;
    # no merge involves "z" or "q", which are not in the training corpus; digits are <unk>.
    tokenizer = model.tokenizer
    assert tokenizer.tokenize("a") == [0, 40, 2]
    assert tokenizer.tokenize("A  0") == [0, 40, 4, 3, 2]
    assert tokenizer.tokenize("zq") == [0, 4, 30, 21, 2]
    assert tokenizer.tokenize("") == [0, 2]


def write_tokenizer_files(directory: Path, merges_text: str) -> TextTokenizer:
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "Ġ": 4, "a": 5, "b": 6, "Ġa": 7, "Ġab": 8}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf8")
    (directory / "merges.txt").write_text(merges_text, encoding="utf8")
    return TextTokenizer.from_files(directory / "vocab.json", directory / "merges.txt")


def test_merges_file_drops_header_and_last_element(tmp_path: Path) -> None:
    # Ending with a newline: the dropped last element is the empty string after it.
    tokenizer = write_tokenizer_files(tmp_path, "#version: 0.2\nĠ a\nĠa b\n")
    assert tokenizer.rank_from_pair == {("Ġ", "a"): 0, ("Ġa", "b"): 1}
    assert tokenizer.tokenize("ab") == [0, 8, 2]

    # Without the final newline, as in min-dalle, the last merge is lost.
    tokenizer = write_tokenizer_files(tmp_path, "#version: 0.2\nĠ a\nĠa b")
    assert tokenizer.rank_from_pair == {("Ġ", "a"): 0}
    assert tokenizer.tokenize("ab") == [0, 7, 6, 2]

    # The first line is dropped whatever it holds.
    tokenizer = write_tokenizer_files(tmp_path, "Ġ a\nĠa b\n")
    assert tokenizer.rank_from_pair == {("Ġa", "b"): 0}
    assert tokenizer.tokenize("ab") == [0, 4, 5, 6, 2]
