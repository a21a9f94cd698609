"""Loggers set for a while: a library's chatter quieted around one call, and as it was after it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def log_level(level: int, *names: str | None) -> Iterator[None]:
    """The loggers `names` (None: the root) at `level` for a while; each at its own level again after."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, was in zip(loggers, before):
            logger.setLevel(was)
