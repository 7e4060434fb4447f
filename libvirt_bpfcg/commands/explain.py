"""``explain``: is DEVICE allowed for this guest, by which rule and why, or what would allow it.

Exit codes are the answer, for scripts: 0 allowed, 1 denied (or undecidable: a program we
cannot read), 2 bad usage or a bad device.
"""

from __future__ import annotations

import argparse
import os
from typing import List, TextIO

from .. import cgroup as cg
from ..cli_common import add_target_arguments, print_json, resolve_state_arguments
from ..errors import OperationError, UsageError
from ..explain import (
    ALLOWED,
    DomainContext,
    Explanation,
    domain_context,
    explain,
    parse_device,
    why_not,
)
from ..state import StateDirs


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "explain", help="is a device allowed for a guest, by which rule, and why",
        description="Evaluate the device filter exactly as the kernel does for one device "
                    "node: every program that runs for the guest's cgroup (ancestors "
                    "included) with libvirt's lookup order. If allowed: the map, key and "
                    "rule, and the domain XML element, metadata extra or runtime grant "
                    "behind it. If denied: recorded denials and the commands that would "
                    "allow it. DEVICE is a path (/dev/loop3, symlinks followed) or "
                    "numbers ('c 1:3', 'b 7:2'); ACCESS is r, w, m or a combination "
                    "(default rw). Exit code 0 allowed, 1 denied or undecidable, 2 bad "
                    "usage.")
    add_target_arguments(parser)
    parser.add_argument("device", metavar="DEVICE",
                        help="/dev/PATH (symlinks followed), or 'c MAJOR:MINOR' / "
                             "'b MAJOR:MINOR' (quoted or as two words)")
    parser.add_argument("words", nargs="*", metavar="ACCESS",
                        help="r, w, m or a combination (default rw)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace, out: TextIO) -> int:
    query = parse_device([args.device, *args.words])
    resolve_state_arguments(args)  # paths not given here come from the config, as the hook's
    dirs = StateDirs(state_dir=args.state_dir, bpffs=args.bpffs)
    ctx: DomainContext | None = None
    notes: List[str] = []
    if args.domain:
        pid = cg.domain_pid(args.domain, args.qemu_run_dir)
        directory = cg.strip_guest_children(cg.process_cgroup(pid))
        try:
            cg.check_guest_cgroup(directory, f"domain {args.domain}")
        except OperationError as exc:
            notes.append(str(exc))  # explain anyway: it is the answer to "why"
        ctx = domain_context(args.domain, args.qemu_run_dir, args.state_dir,
                             args.loaded_config)
        ctx.pid = pid
    else:
        directory = os.path.abspath(args.cgroup)
        if not os.path.exists(os.path.join(directory, "cgroup.procs")):
            raise UsageError(f"{args.cgroup}: not a cgroup2 directory")
    result = explain(directory, query, dirs, domain=args.domain, ctx=ctx)
    result.notes[:0] = notes
    if args.json:
        print_json(result.to_json(), out)
    else:
        out.write(format_explanation(result))
    return result.exit_code


def format_explanation(result: Explanation) -> str:
    q = result.query
    shown = q.path or (result.names[0] if result.names else "")
    name = f" ({', '.join(dict.fromkeys([shown] + result.names))})" if shown else ""
    target = f"domain {result.target['domain']}, " if result.target["domain"] else ""
    lines = [f"device:  {q.numbers}{name}, access {q.access}",
             f"target:  {target}cgroup {result.target['cgroup']}",
             f"mode:    {result.mode}",
             f"verdict: {result.verdict.upper()}"]
    if result.allowed_by:
        by = result.allowed_by
        lines.append(f"  allowed by {by['rule']} in map {by['map']} (id {by['map_id']}), "
                     f"key {by['key']}")
    for source in result.sources:
        lines.append(f"  because: {source.where}: {source.detail}"
                     + (f" [{source.kind}]" if source.kind != "domain" else ""))
    for prog in result.programs:
        lines.append(f"  {prog.program.describe()} on {prog.where()}: {prog.verdict}")
        if prog.verdict != ALLOWED:
            for found in prog.maps:
                keys = "; ".join(f"{h.kind} {h.describe()} ({why_not(h, q)})"
                                 for h in found.hits) or "no entry for this device"
                lines.append(f"    map {found.label} (id {found.map_id}): {keys}")
    if result.v1 is not None:
        entry = f" by '{result.v1.entry}'" if result.v1.entry else ""
        lines.append(f"  cgroup v1 devices {result.v1.directory} (pid {result.v1.pid}): "
                     f"{result.v1.verdict}{entry}")
    if result.partial:
        lines.append("  " + ", ".join(f"{letter} alone: {verdict}"
                                      for letter, verdict in result.partial.items()))
    shown = {source.where for source in result.sources}
    rows = [row for row in result.plan_rows if row.source not in shown]
    if rows:
        lines.append(f"domain plan ({result.plan_source}), other elements naming it:")
        lines.extend(f"  {row.source}: {row.rule} {row.status}: {row.reason}" for row in rows)
    elif result.plan_source and not result.plan_rows:
        lines.append(f"domain plan ({result.plan_source}): no element names this device")
    if result.denials:
        d = result.denials
        lines.append(f"recorded denials: {d['count']}, last {d['last']} "
                     f"({d['type']} {q.major}:{q.minor} {d['access']})")
    for note in result.notes:
        lines.append(f"note: {note}")
    for suggestion in result.suggestions:
        label = {"allow-now": "to allow it now (kept until revoked or the guest stops):",
                 "metadata": "to allow it at every start (our metadata; --set replaces the "
                             "element, existing entries are kept in this snippet):"}
        lines.append(label.get(suggestion["kind"], suggestion["kind"] + ":"))
        lines.append(f"  {suggestion['command']}")
    return "\n".join(lines) + "\n"
