"""Getting the weights onto a machine: the original Flax checkpoints, or min-dalle's .pt files.

    ensure_weights(paths)      MinDalle, `dalle-farm generate` and every worker call this: it
                               fetches whatever part of the model is missing, once (under a
                               lock, so the workers of one machine do not all download it)
    fetch_weights(paths, …)    `dalle-farm weights fetch`

Where from (`Source`), by default:

- ``$DALLE_FARM_WEIGHTS_URL`` set: a mirror of min-dalle's .pt files (``encoder_mini.pt``, …;
  see model.weights.download.remote_file_name), downloaded as they are.
- otherwise the original checkpoints that the dalle-mini project still publishes on the Hugging
  Face hub (``$HF_ENDPOINT``, default https://huggingface.co): ``dalle-mini/dalle-mini``,
  ``dalle-mini/dalle-mega`` and ``dalle-mini/vqgan_imagenet_f16_16384``. They are downloaded
  (resumable) to ``<models_root>/.checkpoints/``, converted (model.weights.convert), and deleted.

A source can also be a local folder: for the hub layout, ``<folder>/<repo>/`` (or
``<folder>/<repo name>/``) holding the checkpoint's files, e.g. git clones of the hub repositories;
for the .pt layout, the files under their remote names.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from model.errors import WeightsNotFoundError
from model.weights import convert, download, manifest
from model.weights.files import STAGES, WeightPaths

log = logging.getLogger(__name__)

HUB_ENV = "HF_ENDPOINT"
DEFAULT_HUB_URL = "https://huggingface.co"
BART_REPOS = {False: "dalle-mini/dalle-mini", True: "dalle-mini/dalle-mega"}
VQGAN_REPO = "dalle-mini/vqgan_imagenet_f16_16384"
BART_CHECKPOINT_FILES = (convert.CHECKPOINT_FILE, convert.CONFIG_FILE, *convert.TOKENIZER_FILES)
VQGAN_CHECKPOINT_FILES = (convert.CHECKPOINT_FILE, convert.CONFIG_FILE)
CHECKPOINTS_DIR = ".checkpoints"
LOCK_NAME = ".dalle-farm-fetch.lock"

Part = Literal["bart", "vqgan"]
PARTS: tuple[Part, ...] = ("bart", "vqgan")


@dataclass(frozen=True)
class Source:
    """Where weights come from: ``kind`` "hub" (Flax checkpoints, converted) or "pt" (min-dalle's
    files); ``location`` a base URL or a local folder."""

    kind: Literal["hub", "pt"]
    location: str

    @property
    def is_url(self) -> bool:
        return self.location.startswith(("http://", "https://"))

    def __str__(self) -> str:
        what = "Flax checkpoints" if self.kind == "hub" else "min-dalle .pt files"
        return f"{what} from {self.location}"


def default_source() -> Source:
    """$DALLE_FARM_WEIGHTS_URL's .pt mirror when set, else the hub at $HF_ENDPOINT."""
    mirror = os.environ.get(download.WEIGHTS_URL_ENV, "").strip()
    if mirror:
        return Source("pt", mirror)
    return Source("hub", os.environ.get(HUB_ENV, "").strip() or DEFAULT_HUB_URL)


def missing_parts(paths: WeightPaths) -> list[Part]:
    """The parts of a model whose files are not all there: "bart" (tokenizer, encoder,
    decoder) and "vqgan" (the detokenizer)."""
    missing: list[Part] = []
    if not (
        paths.vocab.is_file()
        and paths.merges.is_file()
        and paths.has_stage("encoder")
        and paths.has_stage("decoder")
    ):
        missing.append("bart")
    if not paths.has_stage("detoker"):
        missing.append("vqgan")
    return missing


def ensure_weights(
    paths: WeightPaths,
    *,
    source: Source | None = None,
    show_progress: bool = True,
) -> bool:
    """Fetch whatever part of the model is missing; return whether anything was fetched.

    With everything in place this only looks at the files. Raises WeightsNotFoundError when a
    download fails, and WeightsFormatError when a checkpoint cannot be converted.
    """
    if not missing_parts(paths):
        return False
    with _fetch_lock(Path(paths.models_root)):
        parts = missing_parts(paths)  # another process may have fetched them meanwhile
        if not parts:
            return False
        _fetch(paths, parts, source or default_source(), show_progress=show_progress)
    return True


def fetch_weights(
    paths: WeightPaths,
    source: Source,
    *,
    parts: list[Part] | None = None,
    dtype: torch.dtype = convert.BART_DTYPE,
    keep_checkpoints: bool = False,
    show_progress: bool = True,
) -> list[Part]:
    """Fetch ``parts`` (default: the missing ones) from ``source``; return the parts fetched.

    Folders that are complete but have no manifest get one.
    """
    with _fetch_lock(Path(paths.models_root)):
        todo = missing_parts(paths) if parts is None else parts
        _fetch(
            paths,
            todo,
            source,
            dtype=dtype,
            keep_checkpoints=keep_checkpoints,
            show_progress=show_progress,
        )
        for folder in (paths.dalle_dir, paths.vqgan_dir):
            if folder.is_dir() and manifest.read_manifest(folder) is None:
                manifest.record_folder(folder, source={"kind": "found in place"})
    return todo


def _fetch(
    paths: WeightPaths,
    parts: list[Part],
    source: Source,
    *,
    dtype: torch.dtype = convert.BART_DTYPE,
    keep_checkpoints: bool = False,
    show_progress: bool = True,
) -> None:
    for part in parts:
        log.info("fetching %s (%s) from %s", paths.model_name, part, source)
        if source.kind == "pt":
            _fetch_pt(paths, part, source, show_progress)
        else:
            _fetch_hub(paths, part, source, dtype, keep_checkpoints, show_progress)


# -- min-dalle's .pt files ------------------------------------------------------------------


def _fetch_pt(paths: WeightPaths, part: Part, source: Source, show_progress: bool) -> None:
    pt_files = {stage: paths.stage_files(stage)[1] for stage in STAGES}
    files = [paths.vocab, paths.merges, pt_files["encoder"], pt_files["decoder"]]
    if part == "vqgan":
        files = [pt_files["detoker"]]
    for destination in files:
        if destination.exists():
            continue
        remote = download.remote_file_name(destination.name, paths.is_mega)
        if source.is_url:
            download.ensure_file(
                destination, remote, base_url=source.location, show_progress=show_progress
            )
        else:
            origin = Path(source.location) / remote
            if not origin.is_file():
                raise WeightsNotFoundError(
                    f"{origin} does not exist, so {destination} cannot be copied from it. "
                    f"A folder of min-dalle's .pt files has them under their published names "
                    f"({remote}, …)."
                )
            destination.parent.mkdir(parents=True, exist_ok=True)
            _copy_atomically(origin, destination)
    manifest.record_folder(
        files[0].parent, source={"kind": "min-dalle .pt files", "location": source.location}
    )


# -- the original Flax checkpoints ----------------------------------------------------------


def _fetch_hub(
    paths: WeightPaths,
    part: Part,
    source: Source,
    dtype: torch.dtype,
    keep_checkpoints: bool,
    show_progress: bool,
) -> None:
    repo = BART_REPOS[paths.is_mega] if part == "bart" else VQGAN_REPO
    names = BART_CHECKPOINT_FILES if part == "bart" else VQGAN_CHECKPOINT_FILES
    if source.is_url:
        folder = Path(paths.models_root) / CHECKPOINTS_DIR / repo
        base = source.location.rstrip("/")
        for name in names:
            if not (folder / name).exists():
                download.download_file(
                    f"{base}/{repo}/resolve/main/{name}",
                    folder / name,
                    show_progress=show_progress,
                    advice=hub_advice(repo),
                )
        origin = {"repo": repo, "url": f"{base}/{repo}"}
    else:
        folder = _local_checkpoint(Path(source.location), repo, names)
        origin = {"repo": repo, "folder": str(folder)}

    log.info("converting %s (once; the result is kept in %s)", folder, paths.models_root)
    if part == "bart":
        convert.convert_bart(
            folder,
            paths.models_root,
            is_mega=paths.is_mega,
            dtype=dtype,
            show_progress=show_progress,
            source=origin,
        )
    else:
        convert.convert_vqgan(folder, paths.models_root, show_progress=show_progress, source=origin)
    if source.is_url and not keep_checkpoints:
        shutil.rmtree(folder)
        _remove_empty_parents(folder, Path(paths.models_root))


def hub_advice(repo: str) -> str:
    """What to do when the hub cannot be reached."""
    return (
        f"Get the checkpoint another way (e.g. `git clone https://huggingface.co/{repo}`) and "
        f"run `dalle-farm weights convert FOLDER`, or set {HUB_ENV} to a mirror of the Hugging "
        f"Face hub, or {download.WEIGHTS_URL_ENV} to a mirror of min-dalle's .pt files."
    )


def _local_checkpoint(root: Path, repo: str, names: tuple[str, ...]) -> Path:
    for folder in (root / repo, root / repo.split("/")[-1]):
        if (folder / convert.CHECKPOINT_FILE).is_file():
            missing = [name for name in names if not (folder / name).is_file()]
            if missing and missing != [convert.CONFIG_FILE]:
                raise WeightsNotFoundError(f"{folder} has no {missing[0]}")
            return folder
    raise WeightsNotFoundError(
        f"{root} has no checkpoint of {repo}: expected {root / repo / convert.CHECKPOINT_FILE} "
        f"(or the same under {root / repo.split('/')[-1]})"
    )


# -- helpers --------------------------------------------------------------------------------


@contextmanager
def _fetch_lock(models_root: Path) -> Iterator[None]:
    """Hold an exclusive lock on models_root while fetching: a second process waits, then finds
    the files in place."""
    try:
        models_root.mkdir(parents=True, exist_ok=True)
        handle = (models_root / LOCK_NAME).open("a")
    except OSError as err:
        raise WeightsNotFoundError(
            f"weights are missing in {models_root}, and it cannot be written to fetch them "
            f"({err.strerror or err})"
        ) from err
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _copy_atomically(origin: Path, destination: Path) -> None:
    part = destination.with_name(destination.name + ".part")
    shutil.copyfile(origin, part)
    part.replace(destination)


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    for parent in folder.parents:
        if parent == stop or stop not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:
            return
