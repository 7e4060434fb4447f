"""``doctor``: host readiness, one line per check with the fix. Exit 0 unless a check fails."""

from __future__ import annotations

import argparse
from typing import Sequence, TextIO

from ..cgroup import DEFAULT_QEMU_RUN_DIR
from ..cli_common import print_json
from ..config import DEFAULT_CONFIG_PATH
from ..doctor import DEFAULT_HOOKS_DIR, OK, Check, Paths, exit_code, run_checks, summary
from ..hookclient import SOCKET_PATH
from ..state import DEFAULT_BPFFS


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "doctor", help="check that this host is ready: cgroup2, bpf(2), libvirt, the hook",
        description="Check host readiness: cgroup2 mounts (and hybrid layouts), bpf(2) and "
                    "denial recording, the memlock limit, bpffs, the libvirt version, "
                    "qemu.conf's cgroup settings, whether our hook is installed where libvirt "
                    "looks and whether the running daemon picked it up, whether a hook server "
                    "answers, and the mode of every "
                    "running guest. Each problem comes with a fix. Exit code 0 when no check "
                    "fails, 1 otherwise.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--config", metavar="FILE",
                        help=f"our configuration file (default {DEFAULT_CONFIG_PATH} when it "
                             "exists); its [acl] qemu_conf names qemu.conf")
    parser.add_argument("--hooks-dir", default=DEFAULT_HOOKS_DIR, metavar="DIR",
                        help=f"libvirt's hooks directory (default {DEFAULT_HOOKS_DIR})")
    parser.add_argument("--qemu-run-dir", metavar="DIR",
                        help=f"libvirt's QEMU pid files (default: the config's, else "
                             f"{DEFAULT_QEMU_RUN_DIR})")
    parser.add_argument("--bpffs", metavar="DIR",
                        help=f"bpf file system for pinned maps (default: the config's, else "
                             f"{DEFAULT_BPFFS})")
    parser.add_argument("--hook-socket", default=SOCKET_PATH, metavar="PATH",
                        help=f"where the hook looks for the hook server (default "
                             f"{SOCKET_PATH})")
    parser.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace, out: TextIO) -> int:
    paths = Paths(hooks_dir=args.hooks_dir, qemu_run_dir=args.qemu_run_dir,
                  config=args.config, bpffs=args.bpffs, hook_socket=args.hook_socket)
    checks = run_checks(paths)
    if args.json:
        print_json({"checks": [c.to_json() for c in checks], "summary": summary(checks)}, out)
    else:
        out.write(format_checks(checks))
    return exit_code(checks)


def format_checks(checks: Sequence[Check]) -> str:
    counts = summary(checks)
    width = max(len(c.name) for c in checks)
    lines = [f"libvirt-bpfcg doctor: {counts['ok']} ok, {counts['warn']} warn, "
             f"{counts['fail']} fail", ""]
    for check in checks:
        status = check.status if check.status == OK else check.status.upper()
        lines.append(f"{status:<4}  {check.name:<{width}}  {check.detail}")
        if check.fix and check.status != OK:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {check.fix}")
    return "\n".join(lines) + "\n"
