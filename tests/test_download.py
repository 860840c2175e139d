"""Tests for model.weights.download against a real HTTP server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from model.errors import WeightsNotFoundError
from model.weights import download
from model.weights.download import (
    DEFAULT_WEIGHTS_URL,
    WEIGHTS_URL_ENV,
    download_file,
    ensure_file,
    remote_file_name,
    weights_base_url,
)
from tests.servers import FileServer, file_server, free_port

# A few 1 MiB chunks and not a multiple of one, so breaks can fall after whole chunks.
BLOB = bytes(range(256)) * 9000 + b"tail"


@pytest.fixture
def server() -> Iterator[FileServer]:
    with file_server() as state:
        yield state


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_RETRY_BACKOFF_S", 0.0)


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


# --- plain downloads ---------------------------------------------------------------------


@pytest.mark.parametrize("show_progress", [False, True])
def test_plain_download_is_byte_identical(
    server: FileServer, tmp_path: Path, show_progress: bool
) -> None:
    server.files["encoder.pt"] = BLOB
    dest = tmp_path / "new" / "folder" / "encoder.pt"

    download_file(server.file_url("encoder.pt"), dest, show_progress=show_progress)

    assert dest.read_bytes() == BLOB
    assert not _part(dest).exists()
    assert server.log == [("encoder.pt", None)]


def test_progress_bar_goes_to_stderr(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.files["encoder.pt"] = BLOB
    download_file(server.file_url("encoder.pt"), tmp_path / "encoder.pt", show_progress=True)
    captured = capsys.readouterr()
    assert "encoder.pt" in captured.err
    assert captured.out == ""


def test_empty_file(server: FileServer, tmp_path: Path) -> None:
    server.files["empty.json"] = b""
    dest = tmp_path / "empty.json"
    download_file(server.file_url("empty.json"), dest, show_progress=False)
    assert dest.read_bytes() == b""


# --- resuming ----------------------------------------------------------------------------


def _range_starts(server: FileServer) -> list[int]:
    return [0 if r is None else int(r.removeprefix("bytes=").rstrip("-")) for _, r in server.log]


def test_break_mid_transfer_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    server.files["decoder.pt"] = BLOB
    cut = 1_500_000
    server.breaks = [cut]
    dest = tmp_path / "decoder.pt"

    download_file(server.file_url("decoder.pt"), dest, show_progress=False)

    assert dest.read_bytes() == BLOB
    assert not _part(dest).exists()
    assert server.log[0] == ("decoder.pt", None)
    # The retry asks for the rest, starting after what was kept (at most the bytes sent).
    assert len(server.log) == 2
    assert 0 < _range_starts(server)[1] <= cut


def test_repeated_breaks_each_resume_where_the_last_stopped(
    server: FileServer, tmp_path: Path
) -> None:
    server.files["decoder.pt"] = BLOB
    cuts = [1_200_000, 1_100_000]
    server.breaks = list(cuts)
    dest = tmp_path / "decoder.pt"

    download_file(server.file_url("decoder.pt"), dest, show_progress=False)

    assert dest.read_bytes() == BLOB
    starts = _range_starts(server)
    assert len(starts) == 3
    for previous, cut, start in zip(starts[:-1], cuts, starts[1:], strict=True):
        assert previous < start <= previous + cut


def test_existing_part_file_is_resumed(server: FileServer, tmp_path: Path) -> None:
    server.files["encoder.pt"] = BLOB
    dest = tmp_path / "encoder.pt"
    _part(dest).write_bytes(BLOB[:12345])

    download_file(server.file_url("encoder.pt"), dest, show_progress=False)

    assert dest.read_bytes() == BLOB
    assert not _part(dest).exists()
    assert server.log == [("encoder.pt", "bytes=12345-")]


def test_complete_part_file_answered_416_is_finished(server: FileServer, tmp_path: Path) -> None:
    server.files["encoder.pt"] = BLOB
    dest = tmp_path / "encoder.pt"
    _part(dest).write_bytes(BLOB)

    download_file(server.file_url("encoder.pt"), dest, show_progress=False)

    assert dest.read_bytes() == BLOB
    assert server.log == [("encoder.pt", f"bytes={len(BLOB)}-")]


def test_part_file_longer_than_remote_is_discarded(server: FileServer, tmp_path: Path) -> None:
    server.files["vocab.json"] = b'{"a": 1}'
    dest = tmp_path / "vocab.json"
    _part(dest).write_bytes(b"x" * 100)

    download_file(server.file_url("vocab.json"), dest, show_progress=False)

    assert dest.read_bytes() == b'{"a": 1}'
    assert server.log == [("vocab.json", "bytes=100-"), ("vocab.json", None)]


def test_server_ignoring_range_restarts_from_scratch(server: FileServer, tmp_path: Path) -> None:
    server.files["encoder.pt"] = BLOB
    server.honour_ranges = False
    dest = tmp_path / "encoder.pt"
    # Wrong bytes: if they were kept, the result would differ from BLOB.
    _part(dest).write_bytes(b"\xff" * 5000)

    download_file(server.file_url("encoder.pt"), dest, show_progress=False)

    assert dest.read_bytes() == BLOB
    assert server.log == [("encoder.pt", "bytes=5000-")]


def test_break_on_server_ignoring_range(server: FileServer, tmp_path: Path) -> None:
    server.files["encoder.pt"] = BLOB
    server.honour_ranges = False
    server.breaks = [7000]
    dest = tmp_path / "encoder.pt"

    download_file(server.file_url("encoder.pt"), dest, show_progress=False)

    assert dest.read_bytes() == BLOB
    assert len(server.log) == 2


def test_gives_up_when_the_stream_keeps_breaking(server: FileServer, tmp_path: Path) -> None:
    server.files["decoder.pt"] = BLOB
    server.breaks = [0] * 20
    dest = tmp_path / "decoder.pt"

    with pytest.raises(WeightsNotFoundError) as info:
        download_file(server.file_url("decoder.pt"), dest, show_progress=False)

    message = str(info.value)
    assert server.file_url("decoder.pt") in message
    assert "gave up" in message
    assert WEIGHTS_URL_ENV in message
    assert len(server.log) == download._MAX_RETRIES + 1
    assert not dest.exists()
    assert info.value.__cause__ is not None


# --- failures ----------------------------------------------------------------------------


def test_404_raises_weights_not_found(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "dalle_bart_mini" / "encoder.pt"
    url = server.file_url("encoder_mini.pt")

    with pytest.raises(WeightsNotFoundError) as info:
        download_file(url, dest, show_progress=False)

    message = str(info.value)
    assert url in message
    assert "404" in message
    assert str(dest.parent) in message
    assert "encoder.pt" in message
    assert WEIGHTS_URL_ENV in message
    assert "#103" not in message
    assert info.value.__cause__ is not None
    assert not dest.exists()
    assert not _part(dest).exists()
    assert len(server.log) == 1


def test_offline_raises_weights_not_found(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/detoker.pt"
    dest = tmp_path / "vqgan" / "detoker.pt"

    with pytest.raises(WeightsNotFoundError) as info:
        download_file(url, dest, show_progress=False, timeout=2.0)

    message = str(info.value)
    assert url in message
    assert "could not connect" in message
    assert str(dest.parent) in message
    assert WEIGHTS_URL_ENV in message
    assert not dest.exists()


def test_default_url_message_says_the_hub_repository_is_gone(tmp_path: Path) -> None:
    dest = tmp_path / "dalle_bart_mega" / "encoder.pt"
    message = download._not_found_message(
        DEFAULT_WEIGHTS_URL + "encoder.pt", dest, "the server answered HTTP 404 Not Found"
    )
    assert DEFAULT_WEIGHTS_URL + "encoder.pt" in message
    assert "kuprel/min-dalle" in message
    assert "gone" in message
    assert "#103" in message
    assert str(dest.parent) in message
    assert WEIGHTS_URL_ENV in message


# --- URLs and names ----------------------------------------------------------------------


def test_weights_base_url_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEIGHTS_URL_ENV, raising=False)
    assert weights_base_url() == DEFAULT_WEIGHTS_URL
    monkeypatch.setenv(WEIGHTS_URL_ENV, "")
    assert weights_base_url() == DEFAULT_WEIGHTS_URL


@pytest.mark.parametrize(
    "value", ["https://mirror.example/min-dalle", "https://mirror.example/min-dalle/"]
)
def test_weights_base_url_from_env(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(WEIGHTS_URL_ENV, value)
    assert weights_base_url() == "https://mirror.example/min-dalle/"


@pytest.mark.parametrize(
    ("local", "is_mega", "remote"),
    [
        ("encoder.pt", True, "encoder.pt"),
        ("encoder.pt", False, "encoder_mini.pt"),
        ("decoder.pt", False, "decoder_mini.pt"),
        ("vocab.json", False, "vocab_mini.json"),
        ("merges.txt", False, "merges_mini.txt"),
        ("merges.txt", True, "merges.txt"),
        ("detoker.pt", False, "detoker.pt"),
        ("detoker.pt", True, "detoker.pt"),
    ],
)
def test_remote_file_name(local: str, is_mega: bool, remote: str) -> None:
    assert remote_file_name(local, is_mega) == remote


# --- ensure_file -------------------------------------------------------------------------


def test_ensure_file_leaves_an_existing_file_alone(server: FileServer, tmp_path: Path) -> None:
    server.files["encoder.pt"] = BLOB
    dest = tmp_path / "encoder.pt"
    dest.write_bytes(b"already here")

    assert ensure_file(dest, "encoder.pt", base_url=server.url + "/") == dest

    assert dest.read_bytes() == b"already here"
    assert server.log == []


def test_ensure_file_downloads_a_missing_file(server: FileServer, tmp_path: Path) -> None:
    server.files["encoder_mini.pt"] = BLOB
    dest = tmp_path / "dalle_bart_mini" / "encoder.pt"

    got = ensure_file(dest, "encoder_mini.pt", base_url=server.url + "/".rstrip("/"))

    assert got == dest
    assert dest.read_bytes() == BLOB
    assert server.log == [("encoder_mini.pt", None)]


def test_ensure_file_uses_the_env_var(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["detoker.pt"] = BLOB
    monkeypatch.setenv(WEIGHTS_URL_ENV, server.url + "/".rstrip("/"))
    dest = tmp_path / "vqgan" / "detoker.pt"

    ensure_file(dest, "detoker.pt", show_progress=False)

    assert dest.read_bytes() == BLOB
