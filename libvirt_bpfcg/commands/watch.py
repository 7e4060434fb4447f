"""``watch``: the event-loop service that keeps every running guest's filter reconciled."""

from __future__ import annotations

import argparse
from typing import TextIO

from .. import log
from ..cli_common import add_state_arguments, resolve_state_arguments, seconds
from ..state import StateDirs
from ..watch import DEFAULT_POLL_INTERVAL, Watcher


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "watch", help="keep every running guest's filter reconciled (a service)",
        description="Subscribe to libvirt's lifecycle, device-added and device-removed events "
                    "and reconcile the guest concerned: in own mode its map becomes the live "
                    "plan plus the runtime grants, in libvirt mode our overlay (extras plus "
                    "runtime grants) is put back on libvirt's current map. libvirt's own map "
                    "growth swaps programs without an event: each guest's program is "
                    "checked every --poll-interval seconds. Reconnects with backoff when "
                    "libvirtd restarts and then reconciles every running guest. Logs every "
                    "change to stderr (and syslog with --syslog). SIGTERM/SIGINT: exit 0.")
    parser.add_argument("--connect", "-c", metavar="URI", default=None,
                        help="hypervisor connection URI (default: libvirt's, "
                             "LIBVIRT_DEFAULT_URI)")
    parser.add_argument("--once", action="store_true",
                        help="reconcile every running guest once and exit (1 if any failed)")
    parser.add_argument("--poll-interval", type=seconds(0.05, 3600), default=DEFAULT_POLL_INTERVAL,
                        metavar="SECONDS",
                        help="how often each guest's attached program is checked (default "
                             f"{DEFAULT_POLL_INTERVAL:g})")
    parser.add_argument("--syslog", action="store_true", help="also log to syslog")
    add_state_arguments(parser)
    parser.set_defaults(func=run_watch)


def run_watch(args: argparse.Namespace, out: TextIO) -> int:
    resolve_state_arguments(args)
    log.setup(verbose=args.debug, use_syslog=args.syslog, service=True)
    dirs = StateDirs(state_dir=args.state_dir, bpffs=args.bpffs)
    watcher = Watcher(args.connect, args.loaded_config, dirs, args.qemu_run_dir,
                      poll_interval=args.poll_interval)
    return watcher.run(once=args.once)
