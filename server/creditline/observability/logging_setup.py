"""Log set-up: text or JSON lines, each record carrying the trace and span ids of the call
it was written in (when tracing is on), so a log line leads to its trace."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from creditline.observability.telemetry import current_trace_ids

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TraceIdFilter(logging.Filter):
    """Adds trace_id and span_id (hex, or empty outside a traced call) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = current_trace_ids()
        record.trace_id, record.span_id = ids if ids else ("", "")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, trace_id,
    span_id, and the exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            document["trace_id"] = trace_id
            document["span_id"] = getattr(record, "span_id", "")
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        span_id = getattr(record, "span_id", "")
        return f"{text} trace_id={trace_id} span_id={span_id}" if trace_id else text


def configure_logging(log_format: str, level: str, stream: TextIO = sys.stderr) -> None:
    """Replaces the root logger's handlers with one that writes to the stream."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
