"""core/events.py: the SSE encoding of job events, and reading it back."""

from __future__ import annotations

import json

import pytest

from core.events import (
    DONE,
    EVENT_TYPES,
    PREVIEW,
    PROGRESS,
    STATUS,
    Event,
    encode_event,
    encode_retry,
    event_type_of_status,
    is_cursor,
    parse_stream,
    preview_frame,
)


def _lines(data: bytes) -> list[str]:
    return data.decode("ascii").splitlines(keepends=True)


def test_an_event_is_id_event_and_one_line_of_json() -> None:
    event = Event("1700000000000-3", PROGRESS, {"id": "a" * 32, "step": 5, "total": 256})
    text = encode_event(event).decode("ascii")
    lines = text.split("\n")
    assert lines[:3] == [
        "id: 1700000000000-3",
        "event: progress",
        'data: {"id":"' + "a" * 32 + '","step":5,"total":256}',
    ]
    assert text.endswith("\n\n") and text.count("\n") == 4


def test_data_with_line_breaks_and_non_ascii_stays_on_one_line() -> None:
    data = {"id": "x", "error": "line one\nline two\r\u2028 caf\u00e9 \ud800"}
    encoded = encode_event(Event("7", DONE, data))
    assert encoded.count(b"\n") == 4  # id, event, data, blank: nothing split the data
    (parsed,) = parse_stream(_lines(encoded))
    assert parsed == Event("7", DONE, data)


def test_events_round_trip_in_order_and_skip_comments_and_retry() -> None:
    events = [
        Event("1", STATUS, {"id": "j", "status": "queued"}),
        Event("2", PROGRESS, {"id": "j", "step": 1, "total": 256}),
        Event("3", PREVIEW, {"id": "j", "frame": 1, "key": "k", "url": "u"}),
        Event("4", DONE, {"id": "j", "status": "succeeded"}),
    ]
    stream = encode_retry(1500) + b": keep-alive\n\n"
    stream += b"".join(encode_event(event) + b": keep-alive\n\n" for event in events)
    assert list(parse_stream(_lines(stream))) == events


def test_parse_reads_crlf_and_skips_events_that_are_not_json_objects() -> None:
    stream = [
        "id: 1\r\n",
        "event: status\r\n",
        "data: [1, 2]\r\n",
        "\r\n",
        "id: 2\r\n",
        "event: status\r\n",
        "data: not json\r\n",
        "\r\n",
        "id: 3\r\n",
        "event: done\r\n",
        'data: {"id": "j"}\r\n',
        "\r\n",
    ]
    assert list(parse_stream(stream)) == [Event("3", DONE, {"id": "j"})]


def test_an_unknown_type_or_a_bad_cursor_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        encode_event(Event("1", "message", {}))
    for cursor in ("", "a b", "x" * 65, "caf\u00e9", "1\n2"):
        assert not is_cursor(cursor)
        with pytest.raises(ValueError, match="event id"):
            encode_event(Event(cursor, STATUS, {}))
    assert is_cursor("1700000000000-0") and is_cursor("42")


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("queued", STATUS),
        ("running", STATUS),
        ("succeeded", DONE),
        ("failed", DONE),
        ("canceled", DONE),
    ],
)
def test_final_statuses_are_done_events(status: str, kind: str) -> None:
    assert event_type_of_status(status) == kind


def test_preview_frame_comes_from_the_key() -> None:
    job = "0" * 32
    assert preview_frame(f"jobs/{job}/previews/3.png") == 3
    assert preview_frame(f"jobs/{job}/previews/12.png") == 12
    assert preview_frame(f"jobs/{job}/grid.png") is None


def test_retry_field() -> None:
    assert encode_retry(2000) == b"retry: 2000\n\n"
    assert set(EVENT_TYPES) == {STATUS, PROGRESS, PREVIEW, DONE}
    assert json.loads(encode_event(Event("1", STATUS, {"a": 1})).split(b"data: ")[1]) == {"a": 1}
