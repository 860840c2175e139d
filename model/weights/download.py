"""Download weight files: streamed, resumable and atomic.

min-dalle fetches its files from ``DEFAULT_WEIGHTS_URL``, a Hugging Face repository that no
longer exists (min-dalle issue #103). By default dalle-farm fetches the original Flax checkpoints
instead and converts them (model.weights.fetch, with `download_file` doing the transfers); when
``DALLE_FARM_WEIGHTS_URL`` is set, it points to a mirror of min-dalle's files, which land in
the layout under ``models_root``::

    dalle_bart_mega/{vocab.json,merges.txt,encoder.pt,decoder.pt}
    dalle_bart_mini/{vocab.json,merges.txt,encoder.pt,decoder.pt}
    vqgan/detoker.pt

On the server the Mini files carry a ``_mini`` suffix (``encoder_mini.pt``); see
`remote_file_name`.

A download goes to ``<name>.part`` next to the destination and is renamed onto it only once
complete, so a destination file is never half-written. An interrupted download (a broken
stream, or an earlier run that was killed) resumes from the ``.part`` file with an HTTP Range
request.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import requests
from tqdm import tqdm

from model.errors import WeightsNotFoundError

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_URL = "https://huggingface.co/kuprel/min-dalle/resolve/main/"
WEIGHTS_URL_ENV = "DALLE_FARM_WEIGHTS_URL"

# When a stream breaks, the chunk being read is lost (requests does not hand it over), so
# a resumed download repeats at most this much.
_CHUNK_SIZE = 1 << 20
# Consecutive failed attempts that add no bytes before giving up. An attempt that makes
# progress resets the count, so a long download over a flaky link still finishes.
_MAX_RETRIES = 5
_RETRY_BACKOFF_S = 0.5

# Files shared by Mega and Mini, whose remote name has no "_mini" suffix.
_SHARED_FILES = frozenset({"detoker.pt"})


def weights_base_url() -> str:
    """Return the base URL to download weights from, always ending with ``/``.

    This is ``$DALLE_FARM_WEIGHTS_URL`` when set and non-empty, else `DEFAULT_WEIGHTS_URL`.
    """
    return _with_slash(os.environ.get(WEIGHTS_URL_ENV, "").strip() or DEFAULT_WEIGHTS_URL)


def remote_file_name(local_name: str, is_mega: bool) -> str:
    """Map a local file name to its name on the weights server.

    Mini files carry a ``_mini`` suffix remotely (``encoder.pt`` -> ``encoder_mini.pt``);
    Mega files and the shared VQGAN file (``detoker.pt``) keep their name.
    """
    if is_mega or local_name in _SHARED_FILES:
        return local_name
    stem, dot, suffix = local_name.rpartition(".")
    if not dot:
        return f"{local_name}_mini"
    return f"{stem}_mini.{suffix}"


def ensure_file(
    destination: Path,
    remote_name: str,
    *,
    base_url: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Return ``destination``, downloading ``base_url + remote_name`` to it if it is missing.

    An existing file is returned untouched, without any request. ``base_url`` defaults to
    `weights_base_url`. Raises `WeightsNotFoundError` if the download fails.
    """
    destination = Path(destination)
    if destination.exists():
        return destination
    base = weights_base_url() if base_url is None else _with_slash(base_url)
    download_file(base + remote_name, destination, show_progress=show_progress)
    return destination


def download_file(
    url: str,
    destination: Path,
    *,
    show_progress: bool = True,
    timeout: float = 30.0,
    advice: str | None = None,
) -> None:
    """Download ``url`` to ``destination`` atomically, resuming any earlier partial download.

    Bytes go to ``destination.name + ".part"`` in the same folder (created if needed), which
    is renamed onto ``destination`` once complete and, when the server states a size, checked
    against it. A broken stream is resumed from the bytes already written. ``timeout`` applies
    to connecting and to each read. With ``show_progress`` a progress bar is drawn on stderr.

    Raises `WeightsNotFoundError` when the server answers with an HTTP error, cannot be
    reached, or the transfer keeps breaking; a partial ``.part`` file is kept for next time.
    Its message ends with ``advice`` on what to do, by default how to place min-dalle's files.
    """
    destination = Path(destination)
    part = destination.with_name(destination.name + ".part")
    destination.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, destination)

    with (
        requests.Session() as session,
        tqdm(
            desc=destination.name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not show_progress,
            file=sys.stderr,
            delay=0.5,  # a download that fails at once should print only its error
        ) as bar,
    ):
        total = _download_with_retries(session, url, part, destination, timeout, bar, advice)

    size = part.stat().st_size
    if total is not None and size != total:
        # The partial file cannot be trusted any more; start from scratch next time.
        part.unlink()
        reason = f"received {size} bytes but the server announced {total}"
        raise WeightsNotFoundError(_not_found_message(url, destination, reason, advice))
    os.replace(part, destination)
    log.info("downloaded %s (%d bytes)", destination, size)


def _download_with_retries(
    session: requests.Session,
    url: str,
    part: Path,
    destination: Path,
    timeout: float,
    bar: tqdm,
    advice: str | None,
) -> int | None:
    """Run attempts until ``part`` holds the whole file; return the expected size if known."""
    failures = 0
    reached_server = False
    while True:
        try:
            return _fetch_once(session, url, part, timeout, bar)
        except requests.HTTPError as err:
            raise WeightsNotFoundError(
                _not_found_message(url, destination, _http_reason(err), advice)
            ) from err
        except _BrokenTransfer as err:
            reached_server = True
            error: Exception = err
            failures = 0 if err.received else failures + 1
        except (requests.ConnectionError, requests.Timeout) as err:
            # Failing before ever reaching the server means we are offline or the URL is
            # wrong; retrying would only make the user wait.
            if not reached_server:
                raise WeightsNotFoundError(
                    _not_found_message(url, destination, _connection_reason(err, timeout), advice)
                ) from err
            error = err
            failures += 1
        except requests.RequestException as err:
            raise WeightsNotFoundError(
                _not_found_message(url, destination, f"the request failed ({err})", advice)
            ) from err

        if failures > _MAX_RETRIES:
            kept = _file_size(part)
            reason = (
                f"the transfer kept breaking ({error}); gave up after {_MAX_RETRIES} retries "
                f"without progress. The {kept} bytes received so far are kept in {part.name} "
                "and the next attempt resumes from there"
            )
            raise WeightsNotFoundError(
                _not_found_message(url, destination, reason, advice)
            ) from error
        log.warning("download of %s interrupted (%s); resuming", url, error)
        time.sleep(_RETRY_BACKOFF_S * max(failures, 1))


class _BrokenTransfer(Exception):
    """The response stream ended early; ``received`` bytes of it were written."""

    def __init__(self, message: str, received: int) -> None:
        super().__init__(message)
        self.received = received


def _fetch_once(
    session: requests.Session, url: str, part: Path, timeout: float, bar: tqdm
) -> int | None:
    """Make one GET that continues ``part`` from its current size.

    Returns the full file size when the server stated it. Raises `_BrokenTransfer` when the
    stream ends early, and requests' own exceptions otherwise.
    """
    offset = _file_size(part)
    # Ask for identity encoding so that sizes and ranges count the bytes we store.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"

    with session.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if resp.status_code == 416 and offset:
            # Nothing left after `offset`: either the part is already complete, or it is
            # longer than the remote file and belongs to something else.
            total = _content_range_total(resp.headers.get("Content-Range"))
            if total is None or total == offset:
                return offset
            part.unlink()
            raise _BrokenTransfer("the partial download was longer than the remote file", 0)
        resp.raise_for_status()

        if resp.status_code == 206:
            total = _content_range_total(resp.headers.get("Content-Range"))
            if _content_range_start(resp.headers.get("Content-Range")) != offset:
                part.unlink()
                raise _BrokenTransfer("the server resumed at the wrong offset", 0)
            mode = "ab"
        elif resp.status_code == 200:
            # The server ignored the Range header (or there was none): start over.
            offset = 0
            total = _int_or_none(resp.headers.get("Content-Length"))
            mode = "wb"
        else:
            raise requests.HTTPError(f"unexpected HTTP status {resp.status_code}", response=resp)

        bar.reset(total=total)
        bar.update(offset)
        received = 0
        with part.open(mode) as out:
            try:
                for chunk in resp.iter_content(_CHUNK_SIZE):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as err:
                raise _BrokenTransfer(str(err), received) from err

    if total is not None and offset + received < total:
        raise _BrokenTransfer(
            f"the connection closed after {offset + received} of {total} bytes", received
        )
    return total


def _not_found_message(url: str, destination: Path, reason: str, advice: str | None = None) -> str:
    """Build the one message a `WeightsNotFoundError` shows: what failed and what to do."""
    lines = [
        f"Could not download {url}: {reason}.",
        advice
        or f"Either place the file by hand in {destination.parent} as {destination.name}, "
        f"or set {WEIGHTS_URL_ENV} to the base URL of a mirror of min-dalle's .pt files.",
    ]
    if url.startswith(DEFAULT_WEIGHTS_URL):
        lines.append(
            "Note: min-dalle's original hub repository (kuprel/min-dalle on Hugging Face) "
            "is gone (min-dalle issue #103), so the default URL no longer works."
        )
    return "\n".join(lines)


def _http_reason(err: requests.HTTPError) -> str:
    resp = err.response
    if resp is None:
        return str(err)
    return f"the server answered HTTP {resp.status_code} {resp.reason or ''}".rstrip()


def _connection_reason(err: Exception, timeout: float) -> str:
    if isinstance(err, requests.Timeout):
        return f"the server did not answer within {timeout:g} s"
    return "could not connect to the server (offline, unknown host, or connection refused)"


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _content_range_total(value: str | None) -> int | None:
    """The total size in a ``Content-Range`` header (``bytes 0-9/10`` or ``bytes */10``)."""
    if value is None or "/" not in value:
        return None
    return _int_or_none(value.rsplit("/", 1)[1].strip())


def _content_range_start(value: str | None) -> int | None:
    """The first byte position in a ``Content-Range: bytes START-END/TOTAL`` header."""
    if value is None:
        return None
    unit, _, spec = value.strip().partition(" ")
    if unit != "bytes":
        return None
    return _int_or_none(spec.split("-", 1)[0])
