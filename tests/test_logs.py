"""Tests for dengine.logs: JSON and text formats, context fields, idempotent configuration, levels."""

from __future__ import annotations

import enum
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from dengine.logs import EXTRA_FIELDS, configure_logging, node_logger

TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture(autouse=True)
def restore_dengine_logger() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back for the tests that follow."""
    logger = logging.getLogger("dengine")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    root_handlers = list(logging.getLogger().handlers)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    assert logging.getLogger().handlers == root_handlers  # the root logger was never touched


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines_parse_and_carry_the_fields() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    log = logging.getLogger("dengine.raft")
    log.info(
        "became %s",
        "leader",
        extra={"node_id": 1, "term": 3, "index": 42, "peer": 2, "role": "leader", "event": "elected"},
    )
    log.debug("plain")
    records = [json.loads(line) for line in lines(out)]
    assert len(records) == 2
    first = records[0]
    assert TS.match(first["ts"])
    assert first["level"] == "info"
    assert first["logger"] == "dengine.raft"
    assert first["msg"] == "became leader"
    assert first["node_id"] == 1
    assert first["term"] == 3
    assert first["index"] == 42
    assert first["peer"] == 2
    assert first["role"] == "leader"
    assert first["event"] == "elected"
    assert list(first) == ["ts", "level", "logger", "msg", *EXTRA_FIELDS]
    # Absent context is left out, not written as null.
    assert set(records[1]) == {"ts", "level", "logger", "msg"}
    assert records[1]["level"] == "debug"


def test_json_timestamp_is_utc() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    record = logging.LogRecord("dengine.x", logging.INFO, __file__, 1, "m", None, None)
    record.created = 1_795_629_600.25  # 2026-11-25T18:00:00.250Z
    logging.getLogger("dengine.x").handle(record)
    assert json.loads(lines(out)[0])["ts"] == "2026-11-25T18:00:00.250Z"


def test_json_exception_is_one_string_on_one_line() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        logging.getLogger("dengine.storage").exception("sync failed", extra={"node_id": 2})
    (line,) = lines(out)
    record = json.loads(line)
    assert record["level"] == "error"
    assert record["node_id"] == 2
    assert "Traceback" in record["exc"]
    assert "RuntimeError: disk on fire" in record["exc"]


def test_json_handles_enums_and_odd_values_and_quotes() -> None:
    class Role(enum.Enum):
        LEADER = "leader"

    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    logging.getLogger("dengine").info('say "hi"\nthere', extra={"role": Role.LEADER, "event": object()})
    (line,) = lines(out)
    record = json.loads(line)
    assert record["role"] == "leader"
    assert record["msg"] == 'say "hi"\nthere'
    assert record["event"].startswith("<object object")


def test_text_format() -> None:
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    logging.getLogger("dengine.raft").warning(
        "slow follower", extra={"node_id": 1, "term": 3, "index": 42, "peer": 2}
    )
    logging.getLogger("dengine.raft").info("no context")
    first, second = lines(out)
    ts, rest = first.split(" ", 1)
    assert TS.match(ts)
    assert rest == "WARNING dengine.raft node=1 term=3 index=42 peer=2 slow follower"
    assert second.split(" ", 1)[1] == "INFO dengine.raft no context"


def test_text_quotes_values_with_spaces_and_appends_tracebacks() -> None:
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    try:
        raise KeyError("k")
    except KeyError:
        logging.getLogger("dengine").error("failed", exc_info=True, extra={"event": "two words", "role": ""})
    text = out.getvalue()
    assert 'event="two words"' in text
    assert 'role=""' in text
    assert "\nTraceback (most recent call last):" in text
    assert text.rstrip().endswith("KeyError: 'k'")


def test_text_messages_cannot_forge_lines() -> None:
    """A message carrying text from the network (a peer's refusal details) is one line: its
    newlines and other control characters are escaped, so it cannot fake another record."""
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    details = "bad\n2026-01-01T00:00:00.000Z CRITICAL dengine node 1: stopping\r\x1b[2J"
    logging.getLogger("dengine.transport").warning("peer refused: %s", details)
    (line,) = lines(out)
    escaped = r"bad\n2026-01-01T00:00:00.000Z CRITICAL dengine node 1: stopping\r\u001b[2J"
    assert line.endswith("peer refused: " + escaped)


def test_configure_twice_does_not_duplicate_handlers() -> None:
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    configure_logging("info", "text", stream=out)
    logging.getLogger("dengine.kv").info("once")
    assert len(lines(out)) == 1
    assert len(logging.getLogger("dengine").handlers) == 1


def test_reconfigure_switches_format_stream_and_level() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "text", stream=first)
    configure_logging("error", "json", stream=second)
    log = logging.getLogger("dengine.kv")
    log.warning("dropped")
    log.error("kept")
    assert first.getvalue() == ""
    (line,) = lines(second)
    assert json.loads(line)["msg"] == "kept"


def test_handlers_added_by_others_are_kept() -> None:
    theirs = logging.StreamHandler(io.StringIO())
    logging.getLogger("dengine").addHandler(theirs)
    configure_logging("info", "json", stream=io.StringIO())
    configure_logging("info", "text", stream=io.StringIO())
    handlers = logging.getLogger("dengine").handlers
    assert theirs in handlers
    assert len(handlers) == 2


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("debug", ["debug", "info", "warning", "error"]),
        ("INFO", ["info", "warning", "error"]),
        ("warning", ["warning", "error"]),
        ("warn", ["warning", "error"]),
        ("error", ["error"]),
        ("critical", []),
    ],
)
def test_level_filtering(level: str, shown: list[str]) -> None:
    out = io.StringIO()
    configure_logging(level, "json", stream=out)
    log = logging.getLogger("dengine.raft.deep.child")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [json.loads(line)["level"] for line in lines(out)] == shown


def test_invalid_level_or_format_is_refused_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="debug, info, warning"):
        configure_logging("verbose")
    with pytest.raises(ValueError, match="'text' or 'json'"):
        configure_logging("info", "xml")  # type: ignore[arg-type]


def test_only_the_dengine_hierarchy_is_configured() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    logging.getLogger("someapp").error("not ours")
    logging.getLogger("denginex").error("not ours either")
    assert out.getvalue() == ""
    assert logging.getLogger("dengine").propagate is False


def test_propagate_can_be_kept(caplog: pytest.LogCaptureFixture) -> None:
    configure_logging("info", "json", stream=io.StringIO(), propagate=True)
    with caplog.at_level(logging.INFO, logger="dengine"):
        logging.getLogger("dengine.kv").info("seen by root handlers too")
    assert "seen by root handlers too" in caplog.text


def test_node_logger_adds_node_id_and_merges_extra() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = node_logger("raft", 5)
    assert isinstance(log, logging.LoggerAdapter)
    assert log.logger.name == "dengine.raft"
    assert node_logger("dengine.runtime", 5).logger.name == "dengine.runtime"
    log.info("tick")
    log.info("appended", extra={"term": 2, "index": 10})
    log.info("override", extra={"node_id": 6})
    peer_log = log.bind(peer=3)
    peer_log.warning("behind", extra={"index": 7})
    records = [json.loads(line) for line in lines(out)]
    assert records[0]["node_id"] == 5
    assert (records[1]["node_id"], records[1]["term"], records[1]["index"]) == (5, 2, 10)
    assert records[2]["node_id"] == 6
    assert (records[3]["node_id"], records[3]["peer"], records[3]["index"]) == (5, 3, 7)
    # The adapter's own fields were not changed by the calls' extras.
    assert log.extra == {"node_id": 5}


def test_node_logger_in_text_format() -> None:
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    node_logger("raft", 1).info("became leader", extra={"term": 3, "index": 42})
    (line,) = lines(out)
    assert line.split(" ", 1)[1] == "INFO dengine.raft node=1 term=3 index=42 became leader"
