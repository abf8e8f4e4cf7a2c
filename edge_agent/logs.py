"""structlog set-up: JSON lines for a daemon (not on a terminal), key=value on a terminal.

Event names are snake_case facts (``posting_committed``, ``mqtt_connected``); context is bound per
task with contextvars. No secret is ever passed to a log call.
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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
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
