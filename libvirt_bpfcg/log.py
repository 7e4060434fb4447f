"""Logging to stderr and, when available, syslog.

The hook's stderr becomes libvirt's error message, so everything we log there is one line
with the program name in front; syslog gets the same lines for the admin's journal.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

LOGGER_NAME = "libvirt-bpfcg"


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
            self._syslog.syslog(priority, record.getMessage())
        except Exception:  # noqa: BLE001 - logging must never break the caller
            self.handleError(record)


def setup(verbose: bool = False, stream: TextIO | None = None,
          use_syslog: bool = True) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(f"{LOGGER_NAME}: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.addHandler(handler)
    if use_syslog and os.path.exists("/dev/log"):
        sys_handler = _SyslogHandler()
        sys_handler.setLevel(logging.INFO)
        logger.addHandler(sys_handler)
    return logger


def get() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
