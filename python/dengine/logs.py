"""Structured logs for dengine, through the standard :mod:`logging` module.

Every dengine module logs to a logger under ``dengine`` (``dengine.raft``, ``dengine.kv``...).
:func:`configure_logging` puts one handler on that ``dengine`` logger only, never on the root
logger, so an application embedding a node keeps its own logging set-up. Two formats:

* ``text``, for people::

      2026-11-25T18:00:00.000Z INFO dengine.raft node=1 term=3 index=42 became leader

* ``json``, one object per line, for log pipelines::

      {"ts":"2026-11-25T18:00:00.000Z","level":"info","logger":"dengine.raft","msg":"became leader",
       "node_id":1,"term":3,"index":42}

Context travels in the record's ``extra`` fields listed in :data:`EXTRA_FIELDS`; only those present
(and not ``None``) are written, in that order. :func:`node_logger` returns an adapter that adds
``node_id`` to every record, so call sites pass only what changes::

    log = node_logger("raft", node_id=1)
    log.info("became leader", extra={"term": 3, "event": "leader_elected"})
"""

from __future__ import annotations

import enum
import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

__all__ = [
    "EXTRA_FIELDS",
    "LEVELS",
    "LOGGER_NAME",
    "JsonFormatter",
    "NodeLoggerAdapter",
    "TextFormatter",
    "configure_logging",
    "node_logger",
]

LOGGER_NAME: Final = "dengine"
"""The root of dengine's logger hierarchy; the only logger :func:`configure_logging` touches."""

EXTRA_FIELDS: Final = ("node_id", "term", "index", "peer", "role", "event")
"""Context fields taken from a record's ``extra`` and written by both formats, in this order."""

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
"""Level names accepted by :func:`configure_logging` (case-insensitive)."""

_TEXT_KEYS: Final = {"node_id": "node"}
"""Shorter keys in the text format, where lines are read by people."""

_HANDLER_MARK: Final = "_dengine_configured"
"""Attribute set on the handler configure_logging installs, so a second call replaces it."""


def _timestamp(created: float) -> str:
    """RFC 3339 UTC with milliseconds: 2026-11-25T18:00:00.000Z."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _plain(value: object) -> object:
    """Enums (such as ``Role.LEADER``) are logged by value, not as ``Role.LEADER``."""
    return value.value if isinstance(value, enum.Enum) else value


def _extras(record: logging.LogRecord) -> list[tuple[str, object]]:
    fields = record.__dict__
    return [(key, _plain(fields[key])) for key in EXTRA_FIELDS if fields.get(key) is not None]


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if record.exc_info and not record.exc_text:
        # Cached on the record, as logging.Formatter does, so several handlers format it once.
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or None


class JsonFormatter(logging.Formatter):
    """One compact JSON object per record: ts, level (lower case), logger, msg, the
    :data:`EXTRA_FIELDS` present, then ``exc`` and ``stack`` when the record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        exc = _exception_text(self, record)
        if exc:
            line["exc"] = exc
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: a context value of an unexpected type is logged as text, never lost.
        return json.dumps(line, separators=(",", ":"), default=str)


def _text_value(value: object) -> str:
    text = str(value)
    # Quote what would make the line ambiguous to split on spaces and '='.
    if not text or any(c.isspace() or c in '="' for c in text):
        return json.dumps(text)
    return text


def _one_line(message: str) -> str:
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() or c == " " else json.dumps(c)[1:-1] for c in message)


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger> key=value... <msg>``, then the traceback on following lines."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record.created), record.levelname, record.name]
        parts.extend(f"{_TEXT_KEYS.get(key, key)}={_text_value(value)}" for key, value in _extras(record))
        # One record, one line: a message carrying a peer's or a client's text (an error's
        # details) must not be able to start lines that look like records of their own.
        parts.append(_one_line(record.getMessage()))
        text = " ".join(parts)
        exc = _exception_text(self, record)
        if exc:
            text += "\n" + exc
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def configure_logging(
    level: str = "info",
    fmt: Literal["text", "json"] = "text",
    *,
    stream: TextIO | None = None,
    propagate: bool = False,
) -> None:
    """Sends the ``dengine`` logger hierarchy to ``stream`` (default ``sys.stderr``) in ``fmt``,
    dropping records below ``level`` (one of :data:`LEVELS`).

    Idempotent: a second call replaces the handler the first one installed (handlers added by
    anyone else are left alone). ``propagate=False`` (the default) keeps dengine's records from
    also reaching the root logger's handlers, which would print them twice.
    """
    numeric = LEVELS.get(level.lower()) if isinstance(level, str) else None
    if numeric is None:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    formatter: logging.Formatter
    if fmt == "text":
        formatter = TextFormatter()
    elif fmt == "json":
        formatter = JsonFormatter()
    else:
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")

    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.setLevel(numeric)
    logger.propagate = propagate


if TYPE_CHECKING:
    _AdapterBase = logging.LoggerAdapter[logging.Logger]
else:  # LoggerAdapter is subscriptable at runtime only from Python 3.11
    _AdapterBase = logging.LoggerAdapter


class NodeLoggerAdapter(_AdapterBase):
    """Adds the adapter's fields (``node_id`` at least) to every record, merged under the
    call's own ``extra`` (the call wins), which plain ``LoggerAdapter`` replaces before 3.13."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        fields: Mapping[str, object] = self.extra or {}
        extra = kwargs.get("extra")
        kwargs["extra"] = {**fields, **extra} if extra else dict(fields)
        return msg, kwargs

    def bind(self, **fields: object) -> NodeLoggerAdapter:
        """A new adapter on the same logger with more fixed fields, e.g. ``log.bind(peer=2)``."""
        return NodeLoggerAdapter(self.logger, {**(self.extra or {}), **fields})


def node_logger(name: str, node_id: int) -> NodeLoggerAdapter:
    """A logger adapter for node ``node_id``. ``name`` is placed under the ``dengine`` hierarchy
    unless it already is: ``node_logger("raft", 1)`` and ``node_logger("dengine.raft", 1)`` both
    log to ``dengine.raft``."""
    if name != LOGGER_NAME and not name.startswith(LOGGER_NAME + "."):
        name = f"{LOGGER_NAME}.{name}"
    return NodeLoggerAdapter(logging.getLogger(name), {"node_id": node_id})
