"""A running job's checkpoint: the image tokens generated so far, as text for the job record.

A worker saves one every 32 decoder steps (worker/runner.py), so that a job redelivered after
its worker died resumes there.
"""

from __future__ import annotations

import base64

# A token is a VQGAN code below 2**14: two little-endian bytes each.
_TOKEN_BYTES = 2


def encode_tokens(rows: list[list[int]]) -> str:
    """A checkpoint's text: grid_size² rows of equally many tokens, as base64 of uint16s."""
    data = bytearray()
    for row in rows:
        if len(row) != len(rows[0]):
            raise ValueError("checkpoint rows must have the same length")
        for token in row:
            data += int(token).to_bytes(_TOKEN_BYTES, "little")
    return f"{len(rows)}:" + base64.b64encode(bytes(data)).decode("ascii")


def decode_tokens(text: str) -> list[list[int]]:
    """The inverse of encode_tokens. Raises ValueError on text it did not write."""
    count_text, _, payload = text.partition(":")
    try:
        count = int(count_text)
        data = base64.b64decode(payload, validate=True)
    except ValueError as error:
        raise ValueError(f"not a token checkpoint: {error}") from None
    if count < 1 or len(data) % (count * _TOKEN_BYTES):
        raise ValueError("not a token checkpoint: its size does not match its row count")
    tokens = [int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data), 2)]
    length = len(tokens) // count
    return [tokens[row * length : (row + 1) * length] for row in range(count)]
