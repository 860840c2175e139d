"""The manifest beside installed weights, checks against it, and the weights' identity.

Every weights folder that dalle-farm fills (``dalle_bart_mini/``, ``dalle_bart_mega/``,
``vqgan/``) gets a ``manifest.json``::

    {"format": "dalle-farm-manifest/1",
     "files": {"encoder.safetensors": {"sha256": "…", "size": 123}, …},
     "source": {…where the files came from, for people…}}

`verify_folder` re-hashes the files and names each one that does not match. `weights_identity`
names the exact weights a job is rendered with, for job.json: the sha256 of each file a model
loads, and one hash over all of them.

torch-free, so `dalle-farm weights verify|info` start fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.errors import WeightsFormatError
from model.weights.files import WeightPaths
from model.weights.tensor_files import FileRecord

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dalle-farm-manifest/1"
# Files of a weights folder that a manifest covers, besides tensor files (*.pt, *.safetensors).
TEXT_FILE_NAMES = ("vocab.json", "merges.txt", "config.json")
TENSOR_SUFFIXES = (".pt", ".safetensors")
_HASH_CHUNK_BYTES = 1 << 20
# hashlib releases the GIL on large buffers, so files hash in parallel.
_HASH_THREADS = 4


@dataclass(frozen=True)
class Manifest:
    folder: Path
    files: dict[str, FileRecord]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_NAME


@dataclass(frozen=True)
class Mismatch:
    """A file that does not match its manifest, and how."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(paths: list[Path]) -> dict[Path, FileRecord]:
    """sha256 and size of each file, hashed in parallel."""

    def record(path: Path) -> FileRecord:
        return FileRecord(sha256_file(path), path.stat().st_size)

    with ThreadPoolExecutor(max_workers=max(1, min(_HASH_THREADS, len(paths)))) as pool:
        return dict(zip(paths, pool.map(record, paths), strict=True))


def weight_file_names(folder: Path) -> list[str]:
    """The files of ``folder`` that a manifest covers: tensor files and the tokenizer/config."""
    if not folder.is_dir():
        return []
    return sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file() and (path.name in TEXT_FILE_NAMES or path.suffix in TENSOR_SUFFIXES)
    )


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of ``folder``, or None when it has none.

    Raises WeightsFormatError naming the manifest when it is unreadable.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        document = json.loads(path.read_text(encoding="utf8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise WeightsFormatError(f"cannot read the manifest {path}: {err}") from err
    try:
        if document.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        files = {
            str(name): FileRecord(str(entry["sha256"]), int(entry["size"]))
            for name, entry in document["files"].items()
        }
        source = document.get("source") or {}
        if not isinstance(source, dict):
            raise ValueError("source is not an object")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise WeightsFormatError(f"the manifest {path} is malformed ({err})") from err
    return Manifest(Path(folder), files, source)


def write_manifest(
    folder: Path, files: dict[str, FileRecord], source: dict[str, Any] | None = None
) -> Manifest:
    """Write ``folder``'s manifest atomically (a reader never sees half of one)."""
    manifest = Manifest(Path(folder), dict(sorted(files.items())), dict(source or {}))
    document = {
        "format": MANIFEST_FORMAT,
        "files": {name: record.to_json() for name, record in manifest.files.items()},
        "source": manifest.source,
    }
    _write_atomically(manifest.path, json.dumps(document, indent=2) + "\n")
    return manifest


def record_folder(
    folder: Path,
    known: dict[str, FileRecord] | None = None,
    source: dict[str, Any] | None = None,
) -> Manifest:
    """Hash every weight file in ``folder`` (reusing ``known`` records, e.g. computed while the
    file was written) and write the folder's manifest. ``source`` defaults to the old one's."""
    folder = Path(folder)
    known = dict(known or {})
    names = weight_file_names(folder)
    hashed = hash_files([folder / name for name in names if name not in known])
    files = {name: known.get(name) or hashed[folder / name] for name in names}
    if source is None:
        try:
            previous = read_manifest(folder)
        except WeightsFormatError:
            previous = None
        source = previous.source if previous is not None else {}
    return write_manifest(folder, files, source)


def verify_folder(folder: Path) -> list[Mismatch]:
    """Re-hash the files of ``folder`` and return every one that does not match its manifest:
    missing, of another size or hash, or not listed at all. Raises WeightsFormatError when the
    folder has no manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise WeightsFormatError(
            f"{folder} has no {MANIFEST_NAME} to check against; `dalle-farm weights fetch` "
            "writes one"
        )
    mismatches = []
    present = []
    for name, record in manifest.files.items():
        path = folder / name
        if not path.is_file():
            mismatches.append(Mismatch(path, "missing"))
        elif path.stat().st_size != record.size:
            size = path.stat().st_size
            mismatches.append(
                Mismatch(path, f"{size} bytes, the manifest says {record.size} (truncated?)")
            )
        else:
            present.append(path)
    for path, actual in hash_files(present).items():
        if actual.sha256 != manifest.files[path.name].sha256:
            mismatches.append(Mismatch(path, "sha256 differs from the manifest (corrupted)"))
    for name in weight_file_names(folder):
        if name not in manifest.files:
            mismatches.append(Mismatch(folder / name, "not in the manifest"))
    return sorted(mismatches, key=lambda mismatch: str(mismatch.path))


def check_sizes(files: list[Path]) -> None:
    """Cheap check before loading: each file that its folder's manifest lists has the listed
    size. Raises WeightsFormatError naming the first file that does not (truncated, or
    replaced)."""
    manifests: dict[Path, Manifest | None] = {}
    for path in files:
        folder = path.parent
        if folder not in manifests:
            manifests[folder] = read_manifest(folder)
        manifest = manifests[folder]
        record = manifest.files.get(path.name) if manifest is not None else None
        if record is not None and path.stat().st_size != record.size:
            raise WeightsFormatError(
                f"{path} has {path.stat().st_size} bytes, but {manifest.path if manifest else ''} "
                f"says {record.size}: the file is truncated or was replaced. Check with "
                "`dalle-farm weights verify`, and fetch the weights again."
            )


def identity_hash(files: dict[str, str]) -> str:
    """One sha256 over {relative path: sha256} of a model's files: the weights' identity."""
    canonical = json.dumps(dict(sorted(files.items())), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def weights_identity(
    paths: WeightPaths, *, verify: bool = True, record: bool = False
) -> dict[str, Any]:
    """Name the exact weights a model loads, for job.json.

    Returns ``{"model": "mini"|"mega", "sha256": <identity hash>, "files": {path relative to
    models_root: sha256}, "manifests": {manifest path: sha256 of its bytes}, "format":
    "safetensors"|"pt"|"mixed"}``. ``sha256`` is `identity_hash` of ``files``: it changes when
    and only when a file the model reads changes.

    With ``verify`` (the default) every file is re-hashed and must match its manifest, otherwise
    WeightsFormatError names the file; that takes about a second per GB. Without it, the
    manifest's hashes are trusted. A folder without a manifest (files placed by hand) is
    hashed; with ``record`` it also gets a manifest, so that `dalle-farm weights verify` has a
    reference (by default nothing is written).
    """
    root = Path(paths.models_root)
    files = paths.model_files()
    manifests = {folder: read_manifest(folder) for folder in {path.parent for path in files}}
    to_hash = [
        path
        for path in files
        if verify or manifests[path.parent] is None or path.name not in _listed(manifests, path)
    ]
    hashed = hash_files(to_hash)
    digests: dict[str, str] = {}
    for path in files:
        manifest = manifests[path.parent]
        listed = manifest.files.get(path.name) if manifest is not None else None
        actual = hashed.get(path)
        if listed is not None and actual is not None and actual != listed:
            assert manifest is not None
            raise WeightsFormatError(
                f"{path} does not match {manifest.path} (the file is corrupted or was "
                "replaced). Run `dalle-farm weights verify`, and fetch the weights again."
            )
        digests[path.relative_to(root).as_posix()] = (actual or listed or FileRecord("", 0)).sha256
    for folder, manifest in manifests.items():
        if manifest is None and record:
            try:
                known = {path.name: hashed[path] for path in files if path.parent == folder}
                manifests[folder] = record_folder(folder, known, {"kind": "found in place"})
            except OSError as err:  # a read-only models folder: identity works all the same
                log.warning("cannot write a manifest in %s: %s", folder, err)
    suffixes = {path.suffix for path in files if path.suffix in TENSOR_SUFFIXES}
    return {
        "model": paths.model_name,
        "sha256": identity_hash(digests),
        "files": digests,
        "manifests": {
            (folder / MANIFEST_NAME).relative_to(root).as_posix(): sha256_file(
                folder / MANIFEST_NAME
            )
            for folder in sorted(manifests)
            if (folder / MANIFEST_NAME).is_file()
        },
        "format": suffixes.pop().lstrip(".") if len(suffixes) == 1 else "mixed",
    }


def _listed(manifests: dict[Path, Manifest | None], path: Path) -> dict[str, FileRecord]:
    manifest = manifests[path.parent]
    return manifest.files if manifest is not None else {}


def _write_atomically(path: Path, text: str) -> None:
    # Several workers may start at once: each writes a whole file and renames it into place.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
