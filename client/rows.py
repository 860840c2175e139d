"""A bulk run's input: prompt rows read from a file, and the jobs planned from them.

Input files:

- ``.txt``: one prompt per line; blank lines are skipped.
- ``.csv``: a header line naming a ``prompt`` column (or ``text``), and optionally ``seed`` and
  any of the settings in ROW_SETTINGS; an empty cell takes the run's setting.
- ``.jsonl``: one JSON object per line, with ``prompt`` (or ``text``), and optionally ``seed``
  and settings, as JSON values.

Everything is checked before anything is submitted (`read_rows` then `plan_jobs`); each
problem is reported with its line number as an InputError.

Each row gives `seeds_per_prompt` jobs. A row's seed is its first job's seed, and the next
jobs take the seeds after it; a row without a seed (or with one ≤ 0, "random" to the API) gets
seeds derived from its position and prompt, so a run and its re-runs draw the same images.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.job import SEED_MAX, InvalidParams, parse_params

# Largest grid size any farm may accept (DALLE_FARM_MAX_GRID_SIZE's upper bound); the server
# checks its own limit.
MAX_GRID_SIZE = 16
MAX_SEEDS_PER_PROMPT = 1000
PROMPT_COLUMNS = ("prompt", "text")
ROW_SETTINGS = (
    "grid_size",
    "is_seamless",
    "temperature",
    "top_k",
    "supercondition_factor",
    "model",
)
ROW_FIELDS = (*PROMPT_COLUMNS, "seed", *ROW_SETTINGS)
_INTEGERS = ("seed", "grid_size", "top_k")
_FLOATS = ("temperature", "supercondition_factor")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# Errors listed in an InputError before "and N more".
_ERRORS_SHOWN = 5


class InputError(ValueError):
    """The input file cannot be read as prompt rows; the message names the lines."""


@dataclass(frozen=True)
class Row:
    """One input row: its position among the rows, its line in the file, and what it sets."""

    index: int
    line: int
    prompt: str
    seed: int | None
    settings: dict[str, Any]


@dataclass(frozen=True)
class PlannedJob:
    """One job of a run: `key` names its images in the dataset; `params` is the API body."""

    key: str
    row: int
    line: int
    sample: int
    params: dict[str, Any]

    @property
    def prompt(self) -> str:
        text: str = self.params["text"]
        return text


def read_rows(path: Path) -> list[Row]:
    """The rows of a .txt, .csv or .jsonl file; InputError listing the bad lines if any."""
    suffix = path.suffix.lower()
    readers = {".txt": _txt_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows}
    if suffix not in readers:
        raise InputError(f"{path}: the prompts file must end in .txt, .csv or .jsonl")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    errors: list[str] = []
    lines = _decode_lines(data, errors)
    fields = readers[suffix](lines, errors)
    rows: list[Row] = []
    for line, values in fields:
        row = _row(len(rows), line, values, errors)
        if row is not None:
            rows.append(row)
    if errors:
        raise InputError(_summary(path, errors))
    if not rows:
        raise InputError(f"{path}: no prompts in the file")
    return rows


def plan_jobs(
    rows: list[Row], defaults: Mapping[str, Any], seeds_per_prompt: int, *, source: str = "input"
) -> list[PlannedJob]:
    """Every job of the run: `seeds_per_prompt` per row, the row's settings over `defaults`.
    InputError if a row's settings are not valid job parameters."""
    if not 1 <= seeds_per_prompt <= MAX_SEEDS_PER_PROMPT:
        raise InputError(f"seeds per prompt must be from 1 to {MAX_SEEDS_PER_PROMPT}")
    jobs: list[PlannedJob] = []
    errors: list[str] = []
    for row in rows:
        for sample in range(seeds_per_prompt):
            if row.seed is not None and row.seed > 0:
                seed = (row.seed - 1 + sample) % SEED_MAX + 1
            else:
                seed = derived_seed(row.index, sample, row.prompt)
            body = {**defaults, **row.settings, "text": row.prompt, "seed": seed}
            try:
                params = parse_params(body, max_grid_size=MAX_GRID_SIZE).to_dict()
            except InvalidParams as error:
                errors.append(f"line {row.line}: {error}")
                break
            del params["progressive_outputs"]
            del params["priority"]  # the run's, not the plan's (client.bulk.BulkOptions)
            key = f"{row.index:06d}_{sample:03d}"
            jobs.append(PlannedJob(key, row.index, row.line, sample, params))
    if errors:
        raise InputError(_summary(source, errors))
    return jobs


def derived_seed(row: int, sample: int, prompt: str) -> int:
    """A seed from 1 to SEED_MAX that depends only on the row's position, sample and prompt."""
    digest = hashlib.sha256(f"{row}\n{sample}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MAX + 1


def dataset_id(jobs: list[PlannedJob]) -> str:
    """sha256 of the whole plan: every job's key and parameters. Same input and settings, same
    id; the jobs' Idempotency-Keys derive from it."""
    canonical = json.dumps(
        [[job.key, job.params] for job in jobs], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# -- the formats ------------------------------------------------------------------------------

Fields = list[tuple[int, dict[str, Any]]]


def _decode_lines(data: bytes, errors: list[str]) -> list[str]:
    lines = data.split(b"\n")
    decoded: list[str] = []
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            errors.append(f"line {number}: not UTF-8 text (byte {error.start + 1})")
            text = ""
        decoded.append(text.removesuffix("\r"))
    if decoded and decoded[-1] == "":
        decoded.pop()
    return decoded


def _txt_rows(lines: list[str], errors: list[str]) -> Fields:
    return [(number, {"prompt": line}) for number, line in enumerate(lines, 1) if line.strip()]


def _csv_rows(lines: list[str], errors: list[str]) -> Fields:
    reader = csv.reader(io.StringIO("\n".join(lines), newline=""), strict=True)
    fields: Fields = []
    header: list[str] | None = None
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = [name.strip() for name in record]
                _check_names(header, line, errors, "column")
                continue
            if len(record) != len(header):
                errors.append(
                    f"line {line}: {len(record)} fields, but the header names {len(header)}"
                )
                continue
            cells = zip(header, record, strict=True)
            values = {name: cell for name, cell in cells if cell.strip()}
            fields.append((line, _from_text(values, line, errors)))
    except csv.Error as error:
        errors.append(f"line {reader.line_num}: not valid CSV ({error})")
    if header is None:
        errors.append("line 1: no header line naming a 'prompt' column")
    return fields


def _jsonl_rows(lines: list[str], errors: list[str]) -> Fields:
    fields: Fields = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            errors.append(f"line {number}: not valid JSON ({reason})")
            continue
        if not isinstance(value, dict):
            errors.append(f"line {number}: each line must be a JSON object with a 'prompt'")
            continue
        if _check_names(list(value), number, errors, "field"):
            fields.append((number, value))
    return fields


def _check_names(names: list[str], line: int, errors: list[str], what: str) -> bool:
    ok = True
    for name in names:
        if name not in ROW_FIELDS:
            close = difflib.get_close_matches(name, ROW_FIELDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(ROW_FIELDS)}"
            errors.append(f"line {line}: unknown {what} {name!r}; {hint}")
            ok = False
    prompts = [name for name in names if name in PROMPT_COLUMNS]
    if len(prompts) != 1:
        errors.append(f"line {line}: name exactly one prompt {what}, 'prompt' or 'text'")
        ok = False
    return ok


def _from_text(values: dict[str, str], line: int, errors: list[str]) -> dict[str, Any]:
    """CSV cells (strings) as the JSON types the API takes."""
    typed: dict[str, Any] = {}
    for name, cell in values.items():
        text = cell.strip()
        try:
            if name in _INTEGERS:
                typed[name] = int(text)
            elif name in _FLOATS:
                typed[name] = float(text)
            elif name == "is_seamless":
                typed[name] = _BOOLEANS[text.lower()]
            else:
                typed[name] = cell
        except (ValueError, KeyError):
            kind = "an integer" if name in _INTEGERS else "a number"
            kind = "true or false" if name == "is_seamless" else kind
            errors.append(f"line {line}: {name} must be {kind}, got {text[:40]!r}")
    return typed


def _row(index: int, line: int, values: dict[str, Any], errors: list[str]) -> Row | None:
    prompt = values.get("prompt", values.get("text"))
    if not isinstance(prompt, str) or not prompt.strip():
        errors.append(f"line {line}: the prompt is missing or empty")
        return None
    seed = values.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        errors.append(f"line {line}: seed must be an integer, got {seed!r}"[:200])
        return None
    settings = {name: values[name] for name in ROW_SETTINGS if name in values}
    # Check the row's own values now, with the line number; plan_jobs checks them with the run's.
    try:
        parse_params({"text": prompt.strip(), **settings}, max_grid_size=MAX_GRID_SIZE)
        if seed is not None:
            parse_params({"text": "x", "seed": seed})
    except InvalidParams as error:
        errors.append(f"line {line}: {error}")
        return None
    return Row(index, line, prompt.strip(), seed, settings)


def _summary(source: object, errors: list[str]) -> str:
    shown = "; ".join(errors[:_ERRORS_SHOWN])
    more = f"; and {len(errors) - _ERRORS_SHOWN} more" if len(errors) > _ERRORS_SHOWN else ""
    count = f"{len(errors)} problem{'s' if len(errors) > 1 else ''}"
    return f"{source}: {count}: {shown}{more}; nothing was submitted"
