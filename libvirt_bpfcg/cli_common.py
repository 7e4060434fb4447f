"""Arguments and output helpers shared by the CLI's sub-commands."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, TextIO

from .cgroup import DEFAULT_QEMU_RUN_DIR
from .state import DEFAULT_BPFFS, DEFAULT_STATE_DIR


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``--domain NAME | --cgroup DIR`` plus the overridable host paths."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--domain", "-d", metavar="NAME",
                        help="a running libvirt domain (its QEMU pid's cgroup)")
    target.add_argument("--cgroup", "-c", metavar="DIR", help="a cgroup2 directory")
    add_state_arguments(parser)


def add_state_arguments(parser: argparse.ArgumentParser, config_option: str = "--config"
                        ) -> None:
    """Host paths: from the config file unless given here (the hook reads the same file).
    The hotplug verbs name the file ``--bpfcg-config``: there ``--config`` is virsh's flag.
    Either way it lands in ``args.bpfcg_config``."""
    parser.add_argument(config_option, dest="bpfcg_config", metavar="FILE",
                        help="configuration file (default /etc/libvirt/libvirt-bpfcg.conf)")
    parser.add_argument("--qemu-run-dir", metavar="DIR",
                        help=f"libvirt's QEMU pid files (default {DEFAULT_QEMU_RUN_DIR})")
    parser.add_argument("--state-dir", metavar="DIR",
                        help=f"locks, plans and runtime grants (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--bpffs", metavar="DIR",
                        help=f"bpf file system for pinned maps (default {DEFAULT_BPFFS})")


def resolve_state_arguments(args: argparse.Namespace) -> None:
    """Fill the host paths not given on the command line from the config file."""
    from .config import load_config

    config = load_config(args.bpfcg_config)
    if args.qemu_run_dir is None:
        args.qemu_run_dir = config.qemu_run_dir
    if args.state_dir is None:
        args.state_dir = config.state_dir
    if args.bpffs is None:
        args.bpffs = config.bpffs
    args.loaded_config = config


def print_json(data: Any, out: TextIO) -> None:
    json.dump(data, out, indent=2)
    out.write("\n")


def seconds(minimum: float = 0.0, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a number of seconds from ``minimum`` to ``maximum``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not minimum <= value <= (maximum if maximum is not None else float("inf")):
            raise argparse.ArgumentTypeError(
                f"use {minimum:g} to {maximum:g} seconds" if maximum is not None
                else f"use {minimum:g} seconds or more")
        return value

    return parse
