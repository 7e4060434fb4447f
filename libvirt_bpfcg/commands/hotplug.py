"""``attach-device`` and ``detach-device``: virsh's verbs, keeping the device filter right.

Same arguments, defaults and success messages as virsh (``--config`` here is virsh's "affect
the persistent definition"; our configuration file is ``--bpfcg-config``). After virsh's
line, one ``filter:`` line per change we made to the guest's filter.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ..bpf import sys as bpf
from ..cli_common import add_state_arguments, resolve_state_arguments, seconds
from ..hotplug import (
    DEFAULT_DETACH_TIMEOUT,
    Hotplug,
    HotplugResult,
    LibvirtFailure,
    affect_flags,
    connect,
    lookup_domain,
)
from ..state import StateDirs
from ..xmlsafe import read_input


def register(sub: argparse._SubParsersAction) -> None:
    attach = sub.add_parser(
        "attach-device", help="attach a device from an XML file (virsh attach-device)",
        description="Attach a device to a domain, like 'virsh attach-device'. When we own the "
                    "guest's filter (own mode) the device's rules are granted first and put "
                    "back if libvirt refuses the device; forbidden devices are refused. In "
                    "libvirt mode libvirt grants the device itself and we re-install our "
                    "overlay if libvirt's map growth dropped it.")
    _common(attach)
    attach.set_defaults(func=run_attach)

    detach = sub.add_parser(
        "detach-device", help="detach a device from an XML file (virsh detach-device)",
        description="Detach a device from a domain, like 'virsh detach-device'. For a live "
                    "detach we wait for libvirt's device-removed event, then revoke the rules "
                    "nothing left in the live domain XML still needs (own mode).")
    _common(detach)
    detach.add_argument("--timeout", type=seconds(), default=DEFAULT_DETACH_TIMEOUT,
                        metavar="SECONDS",
                        help="how long to wait for the guest to release the device "
                             f"(default {DEFAULT_DETACH_TIMEOUT:g})")
    detach.set_defaults(func=run_detach)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect", "-c", metavar="URI", default=None,
                        help="hypervisor connection URI (default: libvirt's, "
                             "LIBVIRT_DEFAULT_URI)")
    parser.add_argument("domain", metavar="DOMAIN", help="domain name, id or uuid")
    parser.add_argument("file", metavar="FILE", help="XML file of the device ('-': stdin)")
    parser.add_argument("--persistent", action="store_true",
                        help="make live change persistent")
    parser.add_argument("--config", action="store_true",
                        help="affect next boot")
    parser.add_argument("--live", action="store_true", help="affect running domain")
    parser.add_argument("--current", action="store_true", help="affect current domain")
    add_state_arguments(parser, config_option="--bpfcg-config")


def _hotplug(args: argparse.Namespace) -> tuple:
    resolve_state_arguments(args)
    config = args.loaded_config
    dirs = StateDirs(state_dir=args.state_dir, bpffs=args.bpffs)
    xml = read_input(args.file)  # before connecting: a bad path is a usage error
    bpf.raise_memlock()
    conn = connect(args.connect)
    dom = lookup_domain(conn, args.domain)
    flags = affect_flags(args.live, args.config, args.persistent, args.current,
                         bool(dom.isActive()))
    return Hotplug(conn, dom, config, dirs, args.qemu_run_dir), \
        xml, flags


def _report(result: HotplugResult, message: str, out: TextIO) -> int:
    out.write(message + "\n")
    for line in result.lines():
        out.write(line + "\n")
    for warning in result.warnings:
        print(f"libvirt-bpfcg: warning: {warning}", file=sys.stderr)
    return 0


def run_attach(args: argparse.Namespace, out: TextIO) -> int:
    hotplug, xml, flags = _hotplug(args)
    try:
        result = hotplug.attach(xml, flags)
    except LibvirtFailure as exc:
        raise LibvirtFailure(f"Failed to attach device from {args.file}: {exc}") from None
    return _report(result, "Device attached successfully", out)


def run_detach(args: argparse.Namespace, out: TextIO) -> int:
    hotplug, xml, flags = _hotplug(args)
    try:
        result = hotplug.detach(xml, flags, args.timeout)
    except LibvirtFailure as exc:
        raise LibvirtFailure(f"Failed to detach device from {args.file}: {exc}") from None
    return _report(result, "Device detached successfully", out)
