"""Logging to stderr and, when available, syslog.

The hook's stderr becomes libvirt's error message, so everything we log there is one line
with the program name in front; syslog gets the same lines for the admin's journal.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import TextIO

LOGGER_NAME = "libvirt-bpfcg"


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
        try:
            sys_handler = logging.handlers.SysLogHandler(address="/dev/log")
        except OSError:
            pass  # no syslog daemon: stderr alone is fine
        else:
            sys_handler.setFormatter(logging.Formatter(f"{LOGGER_NAME}[%(process)d]: %(message)s"))
            sys_handler.setLevel(logging.INFO)
            logger.addHandler(sys_handler)
    return logger


def get() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
