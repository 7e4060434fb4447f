"""The engine in a process of its own, for tests that kill it or run many at once.

    python -m stress.worker SPEC.json

SPEC: ``{"cgroup", "state_dir", "bpffs", "ops": [[verb, [rule, ...]], ...]}`` with verb
``grant``, ``revoke`` or ``ensure`` (ensure_overlay); optional ``wait_go`` (read one line
from stdin before the first op: lets a parent start many workers at the same moment),
``memlock`` (set RLIMIT_MEMLOCK to this many bytes first) and ``record_denials``.

Prints ``ready`` once set up and ``done I`` after op I completed — flushed each time, so a
parent that SIGKILLs this process knows exactly which calls returned. A failing op prints
``error I TYPE: message`` and exits 3. Crash points (BPFCG_CRASH_AT) kill it with SIGKILL.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import List

from libvirt_bpfcg.devfilter import DeviceFilter
from libvirt_bpfcg.errors import BpfcgError
from libvirt_bpfcg.rules import Rule
from libvirt_bpfcg.state import StateDirs


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run(spec: dict) -> int:
    if spec.get("memlock") is not None:
        limit = int(spec["memlock"])
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    dirs = StateDirs(state_dir=spec["state_dir"], bpffs=spec["bpffs"])
    dfilter = DeviceFilter(spec["cgroup"], dirs,
                           record_denials=bool(spec.get("record_denials", True)))
    ops = [(verb, [Rule.parse(text) for text in texts]) for verb, texts in spec["ops"]]
    _say("ready")
    if spec.get("wait_go"):
        sys.stdin.readline()
    for index, (verb, rules) in enumerate(ops):
        try:
            if verb == "grant":
                dfilter.grant(rules)
            elif verb == "revoke":
                dfilter.revoke(rules)
            elif verb == "ensure":
                dfilter.ensure_overlay()
            else:
                raise ValueError(f"unknown op {verb!r}")
        except BpfcgError as exc:
            _say(f"error {index} {type(exc).__name__}: {' '.join(str(exc).split())}")
            return 3
        _say(f"done {index}")
    return 0


def main(argv: List[str]) -> int:
    with open(argv[1], encoding="utf-8") as handle:
        return run(json.load(handle))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
