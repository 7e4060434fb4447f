"""Arguments and output helpers shared by the CLI's sub-commands."""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from .cgroup import DEFAULT_QEMU_RUN_DIR
from .state import DEFAULT_BPFFS, DEFAULT_STATE_DIR


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``--domain NAME | --cgroup DIR`` plus the overridable host paths."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--domain", "-d", metavar="NAME",
                        help="a running libvirt domain (its QEMU pid's cgroup)")
    target.add_argument("--cgroup", "-c", metavar="DIR", help="a cgroup2 directory")
    add_state_arguments(parser)


def add_state_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qemu-run-dir", default=DEFAULT_QEMU_RUN_DIR, metavar="DIR",
                        help=f"libvirt's QEMU pid files (default {DEFAULT_QEMU_RUN_DIR})")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                        help=f"locks and plans (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--bpffs", default=DEFAULT_BPFFS, metavar="DIR",
                        help=f"bpf file system for pinned maps (default {DEFAULT_BPFFS})")


def print_json(data: Any, out: TextIO) -> None:
    json.dump(data, out, indent=2)
    out.write("\n")
