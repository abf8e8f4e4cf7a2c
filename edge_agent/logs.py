"""structlog set-up: JSON lines for a daemon (not on a terminal), key=value on a terminal.

Event names are snake_case facts (``posting_committed``, ``mqtt_connected``); context is bound per
task with contextvars. No secret is ever passed to a log call.

The libraries' own stdlib logging (asyncua, paho, aiosqlite) goes through the same renderer at
WARNING and above, so a service's log is one format. asyncua's session-level errors on a lost
connection ("Publish iteration crashed", with a traceback, every second until the source notices)
are left out: the source reports the loss itself (``opcua_connection_lost``) and reconnects.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

Format = Literal["auto", "json", "console"]


def configure_logging(
    level: str = "info", fmt: Format = "auto", stream: TextIO | None = None
) -> None:
    """Configure structlog; ``stream`` None means standard error as it is when a line is
    written (not the object of the moment: a caller may replace ``sys.stderr``)."""
    shown = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not shown.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=shown.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = _StandardError(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _StandardError)] + [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("asyncua.client.ua_session").setLevel(logging.CRITICAL)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=(
            structlog.PrintLoggerFactory(stream)
            if stream is not None
            else lambda *_: structlog.PrintLogger(sys.stderr)
        ),
        cache_logger_on_first_use=False,
    )


class _StandardError(logging.StreamHandler):  # type: ignore[type-arg]  # typeshed: generic
    """A handler writing to ``stream``, or to ``sys.stderr`` as it is at each record."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream or sys.stderr)
        self._fixed = stream

    def emit(self, record: logging.LogRecord) -> None:
        if self._fixed is None:
            self.stream = sys.stderr
        super().emit(record)
