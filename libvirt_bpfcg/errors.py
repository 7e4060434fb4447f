"""Exception types shared by every layer.

Each error carries the exit code the CLI and the hook report, so that callers never have to
map exception classes to numbers themselves.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class BpfcgError(Exception):
    """Base class: a failure we can explain in one line."""

    exit_code = EXIT_FAILED


class UsageError(BpfcgError):
    """Bad command line, bad rule text or unusable input document."""

    exit_code = EXIT_USAGE


class RuleError(UsageError):
    """A device rule that cannot be parsed or resolved."""


class InputError(UsageError):
    """A domain XML (or config file) we refuse to read."""


class OperationError(BpfcgError):
    """An operation on the host (bpf(2), cgroup, sysfs) failed."""
