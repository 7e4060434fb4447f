"""The ``libvirt-bpfcg`` command line: one sub-command module per verb group.

Exit codes (stable, for scripts): 0 ok, 1 the operation failed, 2 bad usage, bad rule or
unusable input. Errors are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, TextIO

from . import __version__, log
from .cli_common import print_json  # noqa: F401 - re-exported for sub-commands
from .errors import EXIT_FAILED, EXIT_USAGE, BpfcgError

# Each module defines ``register(subparsers)``; the parser it adds sets ``func(args, out)``.
COMMAND_MODULES = [
    "libvirt_bpfcg.commands.filter",
    "libvirt_bpfcg.commands.plan",
    "libvirt_bpfcg.commands.explain", "libvirt_bpfcg.commands.doctor",
    "libvirt_bpfcg.commands.hotplug", "libvirt_bpfcg.commands.watch",
    "libvirt_bpfcg.commands.hookserver",
]


class _Parser(argparse.ArgumentParser):
    """argparse that exits with our usage code (2) and a one-line message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n"
                              f"Try '{self.prog} --help' for more information.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="libvirt-bpfcg",
        description="cgroup v2 device filters for libvirt QEMU guests, byte-compatible with "
                    "libvirt's own BPF filter.",
        epilog="Exit codes: 0 ok, 1 operation failed, 2 bad usage or input.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: List[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    log.setup(verbose=args.debug, use_syslog=False)
    try:
        return int(args.func(args, out) or 0)
    except BpfcgError as exc:
        if args.debug:
            raise
        print(f"libvirt-bpfcg: {log.one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (| head): not our failure, and no traceback.
        sys.stderr.close()
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("libvirt-bpfcg: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
