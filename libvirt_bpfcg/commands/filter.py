"""``allow``, ``revoke`` and ``status``: the engine on the command line."""

from __future__ import annotations

import argparse
import os
from typing import List, TextIO

from .. import cgroup as cg
from ..bpf import sys as bpf
from ..cli_common import add_target_arguments, print_json, resolve_state_arguments
from ..devfilter import Change, DeviceFilter
from ..errors import UsageError
from ..rules import Rule, parse_rule_arg
from ..state import StateDirs


def register(sub: argparse._SubParsersAction) -> None:
    allow = sub.add_parser(
        "allow", help="grant device rules to a guest or cgroup",
        description="Grant device rules. Each RULE is one argument: 'c 1:3 rw', 'b 8:* r', "
                    "'a *:* rwm', '/dev/null rw', '/dev/null' (access defaults to rw), or a "
                    "/proc/devices class 'char-pts rw' / 'block-loop r' (globs allowed).")
    add_target_arguments(allow)
    allow.add_argument("rules", nargs="+", metavar="RULE")
    allow.add_argument("--json", action="store_true", help="machine-readable output")
    allow.set_defaults(func=run_allow)

    revoke = sub.add_parser(
        "revoke", help="take device rules away again",
        description="Revoke device rules granted with 'allow' (same RULE forms). In libvirt "
                    "mode only our overlay can be changed; libvirt's own entries stay.")
    add_target_arguments(revoke)
    revoke.add_argument("rules", nargs="+", metavar="RULE")
    revoke.add_argument("--json", action="store_true", help="machine-readable output")
    revoke.set_defaults(func=run_revoke)

    status = sub.add_parser(
        "status", help="show a guest's device filter: mode, programs, rules, denials",
        description="Show the device filter of a guest or cgroup: the mode (none, own, "
                    "libvirt, foreign), attached programs, every rule with the map holding "
                    "it and the device nodes it covers, map capacity and recorded denials.")
    add_target_arguments(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=run_status)


def open_filter(args: argparse.Namespace) -> DeviceFilter:
    resolve_state_arguments(args)
    dirs = StateDirs(state_dir=args.state_dir, bpffs=args.bpffs)
    if args.domain:
        directory = cg.domain_cgroup(args.domain, run_dir=args.qemu_run_dir)
        return DeviceFilter(directory, dirs, what=f"domain {args.domain}")
    directory = os.path.abspath(args.cgroup)
    if not os.path.isdir(directory) or not os.path.exists(os.path.join(directory,
                                                                       "cgroup.procs")):
        raise UsageError(f"{args.cgroup}: not a cgroup2 directory")
    return DeviceFilter(directory, dirs)


def _parse_rules(texts: List[str]) -> List[Rule]:
    rules: List[Rule] = []
    for text in texts:
        rules.extend(parse_rule_arg(text))
    return rules


def _report(change: Change, verb: str, args: argparse.Namespace, out: TextIO) -> int:
    if args.json:
        print_json({
            "mode": change.mode,
            "changed": [str(r) for r in change.changed],
            "unchanged": [str(r) for r in change.unchanged],
            "conflicts": [[str(a), str(b)] for a, b in change.conflicts],
            "installed": change.installed,
            "grew_to": change.grew_to,
        }, out)
        return 0
    for rule in change.changed:
        out.write(f"{verb} {rule}\n")
    for rule in change.unchanged:
        note = "already allowed" if verb == "allowed" else "not granted by us"
        out.write(f"unchanged {rule} ({note})\n")
    for old, new in change.conflicts:
        out.write(f"warning: {old} and {new} share one map key; the entry allows only the "
                  "access both ask for\n")
    if change.grew_to:
        out.write(f"map grown to {change.grew_to} entries\n")
    return 0


def run_allow(args: argparse.Namespace, out: TextIO) -> int:
    rules = _parse_rules(args.rules)
    bpf.raise_memlock()
    change = open_filter(args).grant(rules, remember=True)
    return _report(change, "allowed", args, out)


def run_revoke(args: argparse.Namespace, out: TextIO) -> int:
    rules = _parse_rules(args.rules)
    change = open_filter(args).revoke(rules)
    return _report(change, "revoked", args, out)


def run_status(args: argparse.Namespace, out: TextIO) -> int:
    status = open_filter(args).status()
    if args.json:
        print_json(status, out)
        return 0
    out.write(f"cgroup:  {status['cgroup']}\n")
    mode = status["mode"]
    if mode == "libvirt":
        mode += " (our overlay installed)" if status["overlay_installed"] else \
            " (libvirt's program only)"
    out.write(f"mode:    {mode}\n")
    if status["reason"]:
        out.write(f"reason:  {status['reason']}\n")
    for prog in status["programs"]:  # type: ignore[union-attr]
        out.write(f"program: id {prog['id']} name {prog['name'] or '(unnamed)'} owner "
                  f"{prog['owner']} attach_flags {prog['attach_flags']} maps "
                  f"{prog['map_ids']}\n")
    for label, cap in status["capacity"].items():  # type: ignore[union-attr]
        out.write(f"map {label}: {cap['used']}/{cap['max']} entries\n")
    rules = status["rules"]
    out.write(f"rules ({len(rules)}):\n")  # type: ignore[arg-type]
    for item in rules:  # type: ignore[union-attr]
        devices = " ".join(item["devices"]) if item["devices"] else "-"
        runtime = " (runtime grant)" if item.get("runtime_grant") else ""
        out.write(f"  {item['rule']:<18} {item['map']:<8} {devices}{runtime}\n")
    denials = status["denials"]
    out.write(f"denials ({len(denials)}):\n")  # type: ignore[arg-type]
    for item in denials:  # type: ignore[union-attr]
        devices = " ".join(item["devices"]) if item["devices"] else "-"
        out.write(f"  {item['rule']:<14} {item['access'] or '-':<4} x{item['count']:<6} "
                  f"last {item['last']}  {devices}\n")
    return 0
