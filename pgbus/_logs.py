"""
How ``pgbus run`` writes its log lines to stderr: ``text`` for people, ``json`` for machines.

Both carry the same fields: the time, the logger's name, the level and the message, plus the
traceback when the record has one. The library itself only logs through `logging` (loggers
``pgbus``, ``pgbus.bridge``, ``pgbus.supervisor`` ...), with a `logging.NullHandler` on
``pgbus``: an application that configures no logging sees nothing from pgbus.
"""

from __future__ import annotations

import datetime
import json
import logging

LOG_FORMATS: tuple[str, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
TEXT_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class JsonFormatter(logging.Formatter):
    """
    One JSON object per record, on one line: ``time`` (ISO 8601 with the UTC offset and
    milliseconds), ``logger``, ``level``, ``message``, and ``exc_info`` (the traceback's text)
    when there is one. Non-ASCII text is kept as it is; newlines are escaped by JSON.
    """

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created).astimezone()
        entry: dict[str, str] = {
            "time": moment.isoformat(timespec="milliseconds"),
            "logger": record.name,
            "level": record.levelname,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for *log_format* (one of `LOG_FORMATS`)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT, TEXT_DATE_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)} (got {log_format!r})")
