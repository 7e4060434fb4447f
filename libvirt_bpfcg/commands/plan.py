"""``plan``: which device rules a domain XML (or a hotplug snippet) needs, and why."""

from __future__ import annotations

import argparse
from typing import List, TextIO

from ..cli import print_json
from ..config import DEFAULT_CONFIG_PATH, load_config
from ..plan import Plan, PlannedDevice, plan_document
from ..xmlsafe import read_input

_STATUS_MARK = {"ok": "ok", "missing": "MISSING", "not-a-device": "no-dev", "skipped": "skip",
                "forbidden": "FORBIDDEN", "lookup-failed": "LOOKUP-FAILED"}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan", help="show the device rules a domain XML needs, with provenance",
        description="Read a domain XML (live or inactive; '-' for stdin) or a single device "
                    "element such as <disk> or <hostdev>, and list every device reference "
                    "libvirt's QEMU driver turns into a cgroup rule: where it comes from, "
                    "the path, the access, what it resolves to on this host, and why. Then "
                    "the merged rule set. Missing devices are findings: the exit code is 0 "
                    "for any usable XML, 2 for unusable input.")
    parser.add_argument("file", metavar="FILE|-", help="domain or device XML; - for stdin")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--config", metavar="FILE",
                        help=f"our configuration file (default {DEFAULT_CONFIG_PATH} "
                             "when it exists)")
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace, out: TextIO) -> int:
    config = load_config(args.config)
    data = read_input(args.file)
    plan = plan_document(data, config)
    if args.json:
        print_json(plan.to_json(), out)
    else:
        out.write(format_plan(plan))
    return 0


def format_plan(plan: Plan) -> str:
    """The human view: a header, one line per reference, the rules, then the problems."""
    lines: List[str] = []
    if plan.domain is not None:
        info = plan.domain
        bits = [f"uuid {info.uuid}" if info.uuid else "",
                f"id {info.id}" if info.id is not None else "inactive XML (no id)"]
        lines.append(f"Domain {info.name or '(no name)'}: " + ", ".join(b for b in bits if b))
        settings = plan.settings
        version = settings.get("libvirt_version") or "unknown"
        lines.append(f"Default ACL: {settings.get('default_acl')} (libvirt {version})")
    else:
        lines.append(f"Device snippet <{plan.settings.get('snippet')}>")
    lines.append("")
    lines.extend(_table(plan.devices))
    lines.append("")
    lines.append(f"Rules ({len(plan.rules)}):")
    lines.extend(f"  {rule}" for rule in plan.rules)
    if len(plan.extra_rules):
        lines.append(f"Extra rules from metadata ({len(plan.extra_rules)}):")
        lines.extend(f"  {rule}" for rule in plan.extra_rules)
    for first, second in plan.conflicts:
        merged = plan.rules.entries[second.key]
        lines.append(f"Conflict: {first} and {second} share one map key; the filter holds "
                     f"{merged}")
    if plan.problems:
        lines.append(f"Problems ({len(plan.problems)}) — a guest start would be refused:")
        for device in plan.problems:
            path = f" {device.path}" if device.path else ""
            lines.append(f"  {device.source}: {device.status}{path}: {device.reason}")
    else:
        lines.append("No problems.")
    return "\n".join(lines) + "\n"


def _table(devices: List[PlannedDevice]) -> List[str]:
    header = ("STATUS", "ACCESS", "RULE", "PATH", "SOURCE")
    rows = [(_STATUS_MARK.get(d.status, d.status), d.access, str(d.rule) if d.rule else "-",
             d.path or "-", d.source) for d in devices]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for index, row in enumerate([header, *rows]):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if index:
            lines.append(f"    {devices[index - 1].reason}")
    return lines
