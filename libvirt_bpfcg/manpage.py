"""The man page, libvirt-bpfcg(8), generated from the CLI's own argparse parser.

``python -m libvirt_bpfcg.manpage > libvirt-bpfcg.8`` (``make man``). The packages run this
at build time, so the page always lists the sub-commands and options the installed CLI
really has; only the sections below that argparse cannot know are written by hand.

The output must stay clean under ``groff -man -Tutf8 -ww`` and lintian: every line of text
is escaped (backslashes, a leading dot or quote, dashes of options).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Iterator, List, Sequence, TextIO, Tuple

from . import __version__

PROG = "libvirt-bpfcg"

FILES = [
    ("/etc/libvirt/libvirt-bpfcg.conf",
     "Configuration (INI). Every key is optional; a missing file means the defaults."),
    ("/etc/libvirt/hooks/qemu.d/50-libvirt-bpfcg",
     "The gate that libvirtd (or virtqemud) runs on every guest event: a shell script that "
     "answers the events libvirt-bpfcg ignores and runs the hook for the others."),
    ("/usr/libexec/libvirt-bpfcg/qemu-hook",
     "The QEMU hook: hands the event to the hook server when one answers, else handles it."),
    ("/run/libvirt-bpfcg",
     "Runtime state: per-guest plans and locks."),
    ("/run/libvirt-bpfcg/hook.sock",
     "The hook server's socket (libvirt-bpfcg-hook.socket starts the server on demand)."),
    ("/sys/fs/bpf/libvirt-bpfcg",
     "Pinned overlay and denial maps (bpffs is mounted at /sys/fs/bpf if absent)."),
]

EXIT_STATUS = [
    ("0", "Success."),
    ("1", "The operation failed; for \\fBexplain\\fR: the device is denied, or a program "
          "we cannot read decides; for \\fBdoctor\\fR: a check failed."),
    ("2", "Bad usage, a bad rule or unusable input (for example an unreadable domain XML)."),
]

# Hand-written sections: (title, list of paragraphs or ("TP", tag, text) items).
MODES = [
    "The hook and the commands decide per guest, from the device programs attached to the "
    "guest's cgroup, how to act:",
    ("none", "No guest cgroup or nothing to do; nothing is changed."),
    ("own", "No device program is attached (libvirt older than 5.10 on cgroup v2, a libvirtd "
            "whose bpf(2) is refused, another launcher). libvirt-bpfcg builds the map and "
            "program itself, with libvirt's exact semantics, from the whole domain: the "
            "default ACL, every device and the extras."),
    ("libvirt", "libvirt's own program is attached. libvirt already grants everything in the "
                "domain XML; libvirt-bpfcg adds only the extras, in an overlay map of its own "
                "that its program consults after libvirt's live map, so libvirt's hotplug and "
                "its re-detection after a daemon restart keep working."),
    ("foreign", "Programs attached by someone else with BPF_F_ALLOW_MULTI or "
                "BPF_F_ALLOW_OVERRIDE (systemd DeviceAllow=, a container runtime). Nothing "
                "can widen them: libvirt-bpfcg says so and changes nothing."),
]

RESTART_NOTE = (
    "libvirtd (or virtqemud with the modular daemons) looks for QEMU hooks only when it "
    "starts or reloads: if neither /etc/libvirt/hooks/qemu nor any executable in "
    "/etc/libvirt/hooks/qemu.d/ existed when it started, the newly installed hook is not "
    "run until the daemon is restarted or sent SIGHUP (for example "
    "\\fBsystemctl reload libvirtd\\fR, \\fBsystemctl reload virtqemud\\fR, or "
    "\\fBkill \\-HUP\\fR \\fIPID\\fR without systemd). The "
    "packages print this advice after installation when a running daemon may need it. "
    "They never install over an existing /etc/libvirt/hooks/qemu."
)


def metadata_section() -> List[object]:
    # The namespace comes from the parser itself, so the page cannot drift from it.
    from .domain_extras import NAMESPACE, PREFIX

    return [
        "Extra devices for one guest (beyond what its domain XML already implies) are "
        f"declared in the domain's <metadata>, in the namespace \\%{esc_opt(NAMESPACE)}:",
        ("EX", [
            "<metadata>",
            f"  <{PREFIX}:extras xmlns:{PREFIX}=\"{NAMESPACE}\">",
            f"    <{PREFIX}:device path=\"/dev/kvmfr0\" access=\"rw\"/>",
            f"    <{PREFIX}:rule>c 195:* rw</{PREFIX}:rule>",
            f"    <{PREFIX}:class access=\"rw\" optional=\"yes\">char-nvidia*</{PREFIX}:class>",
            f"  </{PREFIX}:extras>",
            "</metadata>",
        ]),
        "A device is an absolute path (symlinks followed), a rule is \"TYPE MAJOR:MINOR "
        "ACCESS\" (* for any), a class is a /proc/devices driver name such as char-nvidia* "
        "(globs allowed), granted as \"TYPE MAJOR:* ACCESS\". access is r, rw (the default) "
        "or rwm. A required device that is missing makes the hook refuse the guest's start; "
        "with optional=\"yes\" it is reported and skipped. Anything else inside the element "
        "(an unknown child or attribute, a bad rule) is an error naming the element: a typo "
        "must never silently grant nothing, or too much. Extras pass the same guardrails as "
        "the guest's own devices (see CONFIGURATION).",
        "Set it with \\fBvirsh metadata\\fR \\fIGUEST\\fR \\fB\\-\\-config\\fR "
        f"\\fB\\-\\-uri\\fR \\%{esc_opt(NAMESPACE)} \\fB\\-\\-key\\fR {PREFIX} "
        "\\fB\\-\\-set\\fR \\(aq<extras>...</extras>\\(aq (used at the next start of the "
        "guest) and check the result with \\fBvirsh dumpxml\\fR \\fIGUEST\\fR | "
        "\\fBlibvirt\\-bpfcg plan \\-\\fR. To grant a running guest a device at once, "
        "use the allow command.",
    ]


def configuration_section() -> List[object]:
    # Sections and keys come from the config parser's own schema, so the page cannot drift.
    from .config import _SCHEMA

    sections = "; ".join(f"[{name}] {', '.join(keys)}" for name, keys in _SCHEMA.items())
    return [
        "/etc/libvirt/libvirt-bpfcg.conf is an INI file. Its sections and keys: "
        f"{sections}. Every key is optional and documented in the installed file. An "
        "unknown section or key, or a bad value, is an error naming the file and the key.",
    ] + CONFIGURATION


CONFIGURATION = [
    "Guardrails: grants of the host's own disks, /dev/mem and similar are refused unless "
    "listed in allow_forbidden. With strict = yes a failure at daemon reconnect kills the "
    "guest (libvirt's behaviour for a failing hook); by default it is logged and the guest "
    "keeps running.",
    RESTART_NOTE,
    "When QEMU reports \"Operation not permitted\" for a device: \\fBlibvirt-bpfcg status "
    "\\-\\-domain\\fR \\fINAME\\fR lists the denied devices, newest first; \\fBexplain\\fR "
    "tells which rule allows or why none does, with the command that would allow it; "
    "\\fBdoctor\\fR checks the host, including whether the daemon picked up the hook.",
]

SEE_ALSO = "virsh(1), libvirtd(8), virtqemud(8), bpftool(8)"


# --- roff helpers -----------------------------------------------------------------------

def esc(text: str) -> str:
    """Escape running text: backslashes, and a control character at the start of a line."""
    text = text.replace("\\", "\\e")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def esc_opt(text: str) -> str:
    """Escape an option, usage or command: every '-' is a real minus sign there."""
    return esc(text).replace("-", "\\-")


def _font(word: str, font: str) -> str:
    return f"\\f{font}{word}\\fR"


def _raw(text: str) -> str:
    """Hand-written text may contain our own \\fB..\\fR markup: escape only line starts."""
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in text.split("\n"))


# --- the parser walk --------------------------------------------------------------------

def _subparsers_action(parser: argparse.ArgumentParser
                       ) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def iter_commands(parser: argparse.ArgumentParser, prefix: Tuple[str, ...] = ()
                  ) -> Iterator[Tuple[Tuple[str, ...], argparse.ArgumentParser, str]]:
    """(path of names, sub-parser, one-line help) for every sub-command, depth first.
    Aliases point at the same parser: each parser is listed once, under its first name."""
    action = _subparsers_action(parser)
    if action is None:
        return
    helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    seen: List[int] = []
    for name, sub in action.choices.items():
        if id(sub) in seen:
            continue
        seen.append(id(sub))
        path = prefix + (name,)
        yield path, sub, helps.get(name, "")
        yield from iter_commands(sub, path)


def _usage(parser: argparse.ArgumentParser) -> str:
    # A fixed huge width: one line, the same whatever terminal the build runs in.
    formatter = argparse.HelpFormatter(parser.prog, width=100000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups,
                        prefix="")
    return " ".join(formatter.format_help().split())


def _synopsis(parser: argparse.ArgumentParser) -> List[str]:
    """A usage line: left-adjusted and unhyphenated, so options are neither stretched
    apart nor split at their dashes."""
    first = " ".join(parser.prog.split())
    rest = _usage(parser)[len(first):].strip()
    return [".PP", ".ad l", ".nh", _font(esc_opt(first), "B") + " " + esc_opt(rest),
            ".hy", ".ad"]


def _option_tag(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=100000)
    if not action.option_strings:
        metavar = formatter._metavar_formatter(action, action.dest)(1)[0]
        return _font(esc_opt(metavar), "I")
    names = ", ".join(_font(esc_opt(o), "B") for o in action.option_strings)
    if action.nargs == 0:
        return names
    args = formatter._format_args(action, action.dest.upper())
    return f"{names} {_font(esc_opt(args), 'I')}"


def _option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    formatter = argparse.HelpFormatter(parser.prog)
    return " ".join(formatter._expand_help(action).split())


def _options(parser: argparse.ArgumentParser) -> List[str]:
    out: List[str] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        out += [".TP", _option_tag(parser, action), esc(_option_help(parser, action))]
    return out


# --- the page ---------------------------------------------------------------------------

def _date() -> str:
    # Reproducible builds: dpkg-buildpackage and rpmbuild set SOURCE_DATE_EPOCH.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        when = datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc)
        return when.strftime("%Y-%m-%d")
    return ""


def _section(title: str, items: Sequence[object]) -> List[str]:
    out = [f".SH {title}"]
    for item in items:
        if isinstance(item, str):
            out += [".PP", _raw(item)]
        elif isinstance(item, tuple) and item[0] == "EX":
            out += [".PP", ".RS 4", ".nf"] + [esc(line) for line in item[1]] + [".fi", ".RE"]
        elif isinstance(item, tuple):
            tag, text = item
            out += [".TP", _font(esc(tag), "B"), _raw(text)]
    return out


def render(parser: argparse.ArgumentParser | None = None) -> str:
    if parser is None:
        from .cli import build_parser
        parser = build_parser()
    commands = list(iter_commands(parser))
    title = PROG.upper()
    out = [
        f'.\\" Generated by "python -m libvirt_bpfcg.manpage" from {PROG} {__version__}.',
        '.\\" Do not edit: change the CLI\'s help texts or libvirt_bpfcg/manpage.py.',
        f'.TH "{title}" "8" "{_date()}" "{PROG} {__version__}" "System Administration"',
        ".SH NAME",
        f"{esc_opt(PROG)} \\- cgroup v2 device filters for libvirt QEMU guests",
        ".SH SYNOPSIS",
        *_synopsis(parser),
        ".SH DESCRIPTION",
        ".PP",
        esc(" ".join((parser.description or "").split())),
        ".PP",
        esc(f"{PROG} is a libvirt QEMU hook plus a command line tool. The hook, installed as "
            "/etc/libvirt/hooks/qemu.d/50-libvirt-bpfcg, validates each guest before it "
            "starts and installs or extends the guest's cgroup v2 device filter (a "
            "BPF_PROG_TYPE_CGROUP_DEVICE program) once QEMU runs; the hook-server command "
            "does the hook's work in a resident process, so each event costs less. The "
            "commands plan, show and change a guest's filter by hand."),
        ".SH OPTIONS",
    ]
    out += _options(parser)
    out += [".SH COMMANDS"]
    for path, sub, short in commands:
        out += [f'.SS "{esc_opt(" ".join(path))}"'] + _synopsis(sub)
        text = " ".join((sub.description or short or "").split())
        if text:
            out += [".PP", esc(text)]
        out += _options(sub)
    out += _section("MODES", MODES)
    out += _section("METADATA EXTRAS", metadata_section())
    out += _section("CONFIGURATION", configuration_section())
    out += _section("EXIT STATUS", EXIT_STATUS)
    out += _section("FILES", FILES)
    out += [".SH SEE ALSO", ".PP", esc_opt(SEE_ALSO)]
    return "\n".join(out) + "\n"


def main(argv: List[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    out.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
