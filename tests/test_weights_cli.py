"""Getting weights today (model/weights/fetch.py, model/weights/manifest.py, `dalle-farm weights`).

A loopback HTTP server plays the Hugging Face hub (``/{repo}/resolve/main/{file}``) or a mirror
of min-dalle's .pt files, serving checkpoints written from the small random model
(model/weights/random_flax.py). No real network is used.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cli.main import main
from model import MinDalle, ModelConfig, WeightsFormatError, WeightsNotFoundError
from model.weights import download, fetch
from model.weights.files import STAGES, WeightPaths, read_state_dict
from model.weights.manifest import (
    MANIFEST_NAME,
    identity_hash,
    read_manifest,
    verify_folder,
    weights_identity,
)
from tests.conftest import SMALL_CONFIG
from tests.servers import FileServer, file_server, free_port

TEXT = "a fox in the snow"
HUB_FILES = {
    "dalle-mini/dalle-mini": ("flax_model.msgpack", "config.json", "vocab.json", "merges.txt"),
    "dalle-mini/vqgan_imagenet_f16_16384": ("flax_model.msgpack", "config.json"),
}


# -- a hub on loopback ----------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FileServer]:
    with file_server() as state:
        yield state


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(download.WEIGHTS_URL_ENV, raising=False)
    # Never the real hub: a test that forgets to point somewhere fails at once.
    monkeypatch.setenv(fetch.HUB_ENV, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(download, "_RETRY_BACKOFF_S", 0.0)


def min_dalle_files(paths: WeightPaths) -> tuple[Path, ...]:
    """The files a min-dalle mirror holds: the tokenizer's and the .pt weights."""
    return (paths.vocab, paths.merges, paths.encoder, paths.decoder, paths.detoker)


@pytest.fixture
def hub(server: FileServer, flax_hub: Path) -> FileServer:
    for repo, names in HUB_FILES.items():
        for name in names:
            server.files[f"{repo}/resolve/main/{name}"] = flax_hub / repo / name
    return server


@pytest.fixture(scope="module")
def installed(flax_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> WeightPaths:
    """The hub's checkpoints fetched from a local folder and converted, once per module."""
    root = tmp_path_factory.mktemp("installed")
    paths = WeightPaths(root, is_mega=False)
    fetch.fetch_weights(paths, fetch.Source("hub", str(flax_hub)), show_progress=False)
    return paths


@pytest.fixture
def damaged(installed: WeightPaths, tmp_path: Path) -> WeightPaths:
    """A private copy of the installed weights that a test may damage."""
    shutil.copytree(installed.models_root, tmp_path / "models")
    return WeightPaths(tmp_path / "models", is_mega=False)


def assert_same_weights(expected: WeightPaths, actual: WeightPaths) -> None:
    for stage in STAGES:
        want = read_state_dict(expected.stage_file(stage))
        got = read_state_dict(actual.stage_file(stage))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in want), stage


def tokens(models_root: Path, config: ModelConfig | None = None) -> torch.Tensor:
    model = MinDalle(models_root, device="cpu", is_mega=False, is_verbose=False, config=config)
    return next(model.generate_image_tokens_stream(TEXT, seed=3, grid_size=2, top_k=1))


def run_cli(*args: str | Path) -> int:
    return main([str(arg) for arg in args])


# -- fetch ----------------------------------------------------------------------------------


def test_fetch_downloads_the_checkpoints_converts_and_cleans_up(
    hub: FileServer, original: WeightPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    assert run_cli("weights", "fetch", "--models-root", root, "--from", hub.url) == 0

    paths = WeightPaths(root, is_mega=False)
    assert_same_weights(original, paths)
    assert {name for name, _ in hub.log} == set(hub.files)  # every file once
    assert len(hub.log) == len(hub.files)
    assert not (root / fetch.CHECKPOINTS_DIR).exists()
    bart_manifest = read_manifest(paths.dalle_dir)
    assert bart_manifest is not None
    assert bart_manifest.source["repo"] == "dalle-mini/dalle-mini"
    assert bart_manifest.source["url"] == f"{hub.url}/dalle-mini/dalle-mini"
    assert "installed" in capsys.readouterr().out


def test_fetch_resumes_a_broken_download(
    hub: FileServer, original: WeightPaths, tmp_path: Path
) -> None:
    checkpoint = "dalle-mini/vqgan_imagenet_f16_16384/resolve/main/flax_model.msgpack"
    hub.path_breaks[checkpoint] = 5_000_000
    paths = WeightPaths(tmp_path / "models", is_mega=False)
    fetch.fetch_weights(paths, fetch.Source("hub", hub.url), show_progress=False)

    requests = [range_ for name, range_ in hub.log if name == checkpoint]
    assert requests[0] is None
    assert len(requests) == 2 and requests[1] is not None  # resumed with a Range request
    assert 0 < int(requests[1].removeprefix("bytes=").rstrip("-")) <= 5_000_000
    assert_same_weights(original, paths)


def test_fetch_can_keep_the_checkpoints(hub: FileServer, tmp_path: Path) -> None:
    root = tmp_path / "models"
    assert (
        run_cli(
            "weights", "fetch", "--models-root", root, "--from", hub.url + "/", "--keep-checkpoints"
        )
        == 0
    )
    kept = root / fetch.CHECKPOINTS_DIR / "dalle-mini" / "dalle-mini" / "flax_model.msgpack"
    assert kept.is_file()


def test_fetch_from_a_local_folder(
    installed: WeightPaths, original: WeightPaths, flax_hub: Path
) -> None:
    assert_same_weights(original, installed)
    manifest = read_manifest(installed.vqgan_dir)
    assert manifest is not None
    assert manifest.source["folder"] == str(flax_hub / "dalle-mini" / "vqgan_imagenet_f16_16384")
    assert not (installed.models_root / fetch.CHECKPOINTS_DIR).exists()


def test_fetch_from_a_folder_of_min_dalle_files(original: WeightPaths, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for path in min_dalle_files(original):
        shutil.copyfile(path, mirror / download.remote_file_name(path.name, is_mega=False))
    root = tmp_path / "models"
    assert run_cli("weights", "fetch", "--models-root", root, "--pt-mirror", mirror) == 0

    paths = WeightPaths(root, is_mega=False)
    for stage in STAGES:
        assert paths.stage_file(stage).suffix == ".pt"
    assert paths.encoder.read_bytes() == original.encoder.read_bytes()
    assert verify_folder(paths.dalle_dir) == [] and verify_folder(paths.vqgan_dir) == []


def test_fetch_with_nothing_missing_records_a_manifest(
    original: WeightPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    shutil.copytree(original.models_root, root)
    assert run_cli("weights", "fetch", "--models-root", root) == 0
    assert "already installed" in capsys.readouterr().out
    for folder in ("dalle_bart_mini", "vqgan"):
        manifest = read_manifest(root / folder)
        assert manifest is not None and manifest.source == {"kind": "found in place"}


def test_fetch_from_a_missing_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_cli("weights", "fetch", "--models-root", tmp_path, "--from", tmp_path / "nope")
    assert status == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("dalle-farm: error:") and "\n" not in error
    assert str(tmp_path / "nope") in error


# -- the default when weights are missing ---------------------------------------------------


def test_min_dalle_fetches_and_converts_missing_weights_once(
    hub: FileServer,
    original: WeightPaths,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fresh install renders with no manual step: the original checkpoints are fetched from
    the hub ($HF_ENDPOINT) and converted, once."""
    monkeypatch.setenv(fetch.HUB_ENV, hub.url)
    root = tmp_path / "fresh"
    assert torch.equal(tokens(root), tokens(original.models_root))
    requests = len(hub.log)
    assert requests == len(hub.files)
    assert torch.equal(tokens(root), tokens(original.models_root))
    assert len(hub.log) == requests  # converted once; the second load fetches nothing
    assert WeightPaths(root, False).stage_file("decoder").suffix == ".safetensors"


def test_weights_url_still_points_to_a_min_dalle_mirror(
    server: FileServer, original: WeightPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for path in min_dalle_files(original):
        server.files[download.remote_file_name(path.name, is_mega=False)] = path
    monkeypatch.setenv(download.WEIGHTS_URL_ENV, server.url)
    root = tmp_path / "models"
    # min-dalle's files have no config.json: the small model's sizes are given.
    assert torch.equal(tokens(root, SMALL_CONFIG), tokens(original.models_root))
    assert sorted(name for name, _ in server.log) == sorted(server.files)
    assert WeightPaths(root, False).stage_file("encoder").suffix == ".pt"


def test_workers_starting_together_fetch_once(
    hub: FileServer, original: WeightPaths, tmp_path: Path
) -> None:
    paths = WeightPaths(tmp_path / "models", is_mega=False)
    source = fetch.Source("hub", hub.url)
    results: list[bool] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            results.append(fetch.ensure_weights(paths, source=source, show_progress=False))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert sorted(results) == [False, False, True]
    assert len(hub.log) == len(hub.files)
    assert_same_weights(original, paths)


def test_unreachable_hub_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        MinDalle(tmp_path / "models", device="cpu", is_mega=False, is_verbose=False)
    message = str(info.value)
    assert "dalle-mini/dalle-mini/resolve/main/" in message
    assert "dalle-farm weights convert" in message
    assert fetch.HUB_ENV in message and download.WEIGHTS_URL_ENV in message


# -- verify, loading checks and identity ----------------------------------------------------


def test_verify_passes_on_intact_weights(
    installed: WeightPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("weights", "verify", "--models-root", installed.models_root) == 0
    out = capsys.readouterr().out
    assert f"ok   {installed.dalle_dir}" in out and f"ok   {installed.vqgan_dir}" in out


def test_corrupted_file_fails_verify_and_loading_naming_it(
    damaged: WeightPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    path = damaged.stage_file("decoder")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor
    path.write_bytes(bytes(data))

    assert run_cli("weights", "verify", "--models-root", damaged.models_root) == 1
    captured = capsys.readouterr()
    assert f"BAD  {path}: sha256 differs" in captured.out
    assert str(path) in captured.err and captured.err.count("\n") == 1
    # A worker hashes its weights when it starts (for job.json): it refuses them.
    with pytest.raises(WeightsFormatError, match=str(path)):
        weights_identity(damaged)


def test_truncated_file_fails_verify_and_loading_naming_it(
    damaged: WeightPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    path = damaged.stage_file("encoder")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])

    assert run_cli("weights", "verify", "--models-root", damaged.models_root) == 1
    assert f"BAD  {path}: " in capsys.readouterr().out
    with pytest.raises(WeightsFormatError, match=str(path)) as info:
        MinDalle(damaged.models_root, device="cpu", is_mega=False, is_verbose=False)
    assert "truncated" in str(info.value)


def test_truncated_file_without_a_manifest_fails_loading_naming_it(damaged: WeightPaths) -> None:
    (damaged.dalle_dir / MANIFEST_NAME).unlink()
    path = damaged.stage_file("encoder")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsFormatError, match=str(path)) as info:
        MinDalle(damaged.models_root, device="cpu", is_mega=False, is_verbose=False)
    assert "truncated" in str(info.value)


def test_verify_names_missing_and_unlisted_files(
    damaged: WeightPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged.merges.unlink()
    (damaged.vqgan_dir / "extra.pt").write_bytes(b"x")
    assert run_cli("weights", "verify", "--models-root", damaged.models_root) == 1
    out = capsys.readouterr().out
    assert f"BAD  {damaged.merges}: missing" in out
    assert f"BAD  {damaged.vqgan_dir / 'extra.pt'}: not in the manifest" in out


def test_weights_identity(installed: WeightPaths) -> None:
    identity = weights_identity(installed)
    assert identity["model"] == "mini"
    assert identity["format"] == "safetensors"
    assert set(identity["files"]) == {
        "dalle_bart_mini/vocab.json",
        "dalle_bart_mini/merges.txt",
        "dalle_bart_mini/config.json",
        "dalle_bart_mini/encoder.safetensors",
        "dalle_bart_mini/decoder.safetensors",
        "vqgan/detoker.safetensors",
    }
    assert identity["sha256"] == identity_hash(identity["files"])
    assert set(identity["manifests"]) == {"dalle_bart_mini/manifest.json", "vqgan/manifest.json"}
    # The manifest's hashes, without re-hashing, give the same identity.
    assert weights_identity(installed, verify=False) == identity
    manifest = read_manifest(installed.vqgan_dir)
    assert manifest is not None
    detoker = manifest.files["detoker.safetensors"].sha256
    assert identity["files"]["vqgan/detoker.safetensors"] == detoker


def test_identity_of_hand_placed_files_records_a_manifest(
    original: WeightPaths, tmp_path: Path
) -> None:
    shutil.copytree(original.models_root, tmp_path / "models")
    paths = WeightPaths(tmp_path / "models", is_mega=False)
    identity = weights_identity(paths)
    assert identity["format"] == "pt"
    assert identity["manifests"] == {}
    assert read_manifest(paths.dalle_dir) is None  # nothing written by default
    identity = weights_identity(paths, record=True)
    assert read_manifest(paths.dalle_dir) is not None
    assert weights_identity(paths) == identity
    # Another file → another identity.
    paths.merges.write_text(paths.merges.read_text() + "\n")
    (paths.dalle_dir / MANIFEST_NAME).unlink()
    assert weights_identity(paths)["sha256"] != identity["sha256"]
    assert (
        weights_identity(paths)["files"]["vqgan/detoker.pt"]
        == identity["files"]["vqgan/detoker.pt"]
    )


# -- info and convert -----------------------------------------------------------------------


def test_info_shows_what_is_installed(
    installed: WeightPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("weights", "info", "--models-root", installed.models_root) == 0
    out = capsys.readouterr().out
    assert "DALL·E Mini:" in out and "DALL·E Mega: not installed" in out
    assert "2 layers, 4 heads, embed 64" in out
    lines = out.splitlines()
    encoder = next(line for line in lines if line.startswith("  encoder.safetensors"))
    manifest = read_manifest(installed.dalle_dir)
    assert manifest is not None
    assert "float16" in encoder
    assert manifest.files["encoder.safetensors"].sha256 in encoder
    detoker = next(line for line in lines if line.startswith("  detoker.safetensors"))
    assert "float32" in detoker
    assert weights_identity(installed)["sha256"] in out


def test_info_on_min_dalle_files_without_manifest(
    original: WeightPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    shutil.copytree(original.models_root, root)
    assert run_cli("weights", "info", "--models-root", root) == 0
    out = capsys.readouterr().out
    assert "no manifest" in out and "(hashed now)" in out
    assert "float16" in next(line for line in out.splitlines() if line.startswith("  decoder.pt"))
    assert sorted(path.name for path in root.rglob("*")) == sorted(
        path.name for path in original.models_root.rglob("*")
    )  # info writes nothing


def test_convert_command(
    flax_hub: Path, original: WeightPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = [
        flax_hub / "dalle-mini" / "dalle-mini",
        flax_hub / "dalle-mini" / "vqgan_imagenet_f16_16384",
    ]
    root = tmp_path / "models"
    assert run_cli("weights", "convert", *folders, "--models-root", root) == 0
    assert_same_weights(original, WeightPaths(root, is_mega=False))
    assert f"→ {root / 'vqgan'}" in capsys.readouterr().out


def test_convert_refuses_a_bad_folder_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert run_cli("weights", "convert", tmp_path / "empty", "--models-root", tmp_path) == 1
    error = capsys.readouterr().err
    assert error.startswith("dalle-farm: error:") and error.count("\n") == 1
    assert "flax_model.msgpack" in error


def test_manifest_file_is_json_with_sizes(installed: WeightPaths) -> None:
    document = json.loads((installed.dalle_dir / MANIFEST_NAME).read_text())
    for name, entry in document["files"].items():
        assert entry["size"] == (installed.dalle_dir / name).stat().st_size
        assert len(entry["sha256"]) == 64
