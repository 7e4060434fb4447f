"""``hook-server``: the resident process that handles the QEMU hook's events for it."""

from __future__ import annotations

import argparse
import os
import signal
from typing import TextIO

from .. import log
from ..cli_common import seconds
from ..hookclient import SOCKET_PATH
from ..hookserver import HookServer, bind_listener, systemd_listener, unlink_if_same


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "hook-server", help="handle the QEMU hook's events in a resident process (a service)",
        description="Listen on a root-only unix socket and handle the events the QEMU hook "
                    "sends there, with the engine and the XML parser already loaded: a guest "
                    "start then costs the hook three small processes instead of three full "
                    "imports. The hook handles events itself whenever no server answers, so "
                    "stopping this never stops guests from starting. Serves only root peers "
                    "in its own mount, cgroup and PID namespaces. Takes the socket from "
                    "systemd (libvirt-bpfcg-hook.socket) when activated by it. SIGTERM/SIGINT: "
                    "finish the request in hand, exit 0.")
    parser.add_argument("--socket", metavar="PATH", default=SOCKET_PATH,
                        help="where to listen when systemd passes no socket (default "
                             f"{SOCKET_PATH}, where the hook looks)")
    parser.add_argument("--idle-exit", type=seconds(), default=0, metavar="SECONDS",
                        help="exit after this many seconds without a request (default 0: "
                             "never; under socket activation systemd starts it again)")
    parser.add_argument("--syslog", action="store_true", help="also log to syslog")
    parser.set_defaults(func=run_hook_server)


def run_hook_server(args: argparse.Namespace, out: TextIO) -> int:
    logger = log.setup(verbose=args.debug, use_syslog=args.syslog, service=True)
    listener = systemd_listener()
    bound = None
    if listener is None:
        listener = bind_listener(args.socket)
        bound = os.lstat(args.socket).st_ino
    server = HookServer(listener, idle_exit=args.idle_exit or None)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    logger.info("hook server: listening on %s%s", args.socket if bound else "systemd's socket",
                f", exiting after {args.idle_exit:g} s idle" if args.idle_exit else "")
    try:
        return server.serve()
    finally:
        if bound is not None:
            unlink_if_same(args.socket, bound)
        listener.close()
        logger.info("hook server: stopped after %d request(s)", server.served)
