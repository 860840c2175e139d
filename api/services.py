"""The collaborators the API needs, built once per process and passed to create_app.

`Services` is the seam: tests pass real SQLite ones, `create_app_from_env` builds them from
Settings with a builder (`ServicesBuilder`), by default `services_from_settings`, which takes the
store, storage and queue from core.services (the same backends the workers use) and adds the
tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.queue import JobQueue
from core.settings import Settings
from core.storage import LocalStorage, Storage
from core.store import JobStore

if TYPE_CHECKING:
    from model.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    store: JobStore
    storage: Storage
    queue: JobQueue
    # Counts a prompt's tokens to warn when the model will cut it short; None: no warnings.
    tokenizer: TextTokenizer | None = None


ServicesBuilder = Callable[[Settings], Services]


def services_from_settings(settings: Settings) -> Services:
    """The farm's backends as `settings` describe them (core.services.build_services), and the
    model's tokenizer when its files are under settings.models_root."""
    from core.services import build_services

    # No S3 call at start-up: with the bucket unreachable the API still starts, and /readyz
    # says why it is not ready. A local results folder is only a mkdir.
    farm = build_services(settings, ensure_bucket=False)
    if isinstance(farm.storage, LocalStorage):
        farm.storage.ensure_bucket()
    return Services(
        store=farm.store,
        storage=farm.storage,
        queue=farm.queue,
        tokenizer=load_tokenizer(settings.models_root, settings.model),
    )


def load_tokenizer(models_root: Path, model: str) -> TextTokenizer | None:
    """The model's tokenizer from its vocab.json and merges.txt, or None (logged) when they are
    not there: the API then submits jobs without token-count warnings."""
    from model.tokenizer import TextTokenizer

    folder = Path(models_root) / f"dalle_bart_{model}"
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        logger.info("no tokenizer files in %s: submissions get no token-count warnings", folder)
        return None
    return TextTokenizer.from_files(vocab, merges)
