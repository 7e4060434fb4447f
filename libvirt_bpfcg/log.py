"""Logging to stderr and, when available, syslog.

The hook's stderr becomes libvirt's error message, so everything we log there is one line
with the program name in front; syslog gets the same lines for the admin's journal.
"""

from __future__ import annotations

import io  # loaded with the interpreter: free
import logging
import os
import sys
from typing import TextIO

LOGGER_NAME = "libvirt-bpfcg"


_CONTROL = {c: f"\\x{c:02x}" for c in range(32)}
_CONTROL[0x7F] = "\\x7f"
_CONTROL[ord("\\")] = "\\\\"


def one_line(text: str) -> str:
    """Escape control characters: a message may quote paths and names from a domain XML,
    and a newline there would split libvirt's error message or forge a syslog line."""
    return text.translate(_CONTROL)


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{LOGGER_NAME}: {one_line(record.getMessage())}"


class _SyslogHandler(logging.Handler):
    """Through libc's syslog(3): logging.handlers would import socket, pickle and more on
    every hook call, for the same one line."""

    def __init__(self) -> None:
        super().__init__()
        import syslog

        self._syslog = syslog
        syslog.openlog(LOGGER_NAME, syslog.LOG_PID, syslog.LOG_DAEMON)

    def emit(self, record: logging.LogRecord) -> None:
        priority = self._syslog.LOG_WARNING if record.levelno >= logging.WARNING else \
            self._syslog.LOG_INFO
        try:
            self._syslog.syslog(priority, one_line(record.getMessage()))
        except Exception:  # noqa: BLE001 - logging must never break the caller
            self.handleError(record)


def setup(verbose: bool = False, stream: TextIO | None = None,
          use_syslog: bool = True, service: bool = False) -> logging.Logger:
    """``service``: a long-running command (watch, hook-server) logs what it does to stderr
    too, not only warnings."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    handler.setLevel(logging.DEBUG if verbose else logging.INFO if service else logging.WARNING)
    logger.addHandler(handler)
    if use_syslog and os.path.exists("/dev/log"):
        sys_handler = _SyslogHandler()
        sys_handler.setLevel(logging.INFO)
        logger.addHandler(sys_handler)
    return logger


class CapturedWarnings:
    """``with CapturedWarnings() as buffer:`` also writes this thread's warnings and errors,
    formatted exactly as the hook prints them on stderr, into ``buffer``: the hook server
    relays them as the served hook's stderr, which libvirt turns into its error message."""

    def __init__(self) -> None:
        import threading  # the hook process never needs it

        self.buffer = io.StringIO()
        self._handler = logging.StreamHandler(self.buffer)
        self._handler.setFormatter(_OneLineFormatter())
        self._handler.setLevel(logging.WARNING)
        thread = threading.get_ident()
        self._handler.addFilter(lambda record: record.thread == thread)

    def __enter__(self) -> io.StringIO:
        get().addHandler(self._handler)
        return self.buffer

    def __exit__(self, *exc: object) -> None:
        get().removeHandler(self._handler)


def get() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
