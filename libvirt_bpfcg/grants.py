"""Runtime grants: what an admin added with ``allow`` to a running guest.

They must survive every later reconcile (hook calls, the watcher, libvirt's program swaps)
until revoked or the guest stops. They are kept per cgroup instance —
``<state_dir>/grants/<cgroup-id>.json``, root-only — so they end with the guest's cgroup
(a restarted guest gets a new cgroup, hence a new id) and stale files are collected like pins.
Callers hold the cgroup's lock (StateDirs.lock) around read-modify-write.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterable, List, Set

from . import stale
from .rules import Rule, RuleSet, sort_rules
from .state import cgroup_id, make_private_dir


class GrantStore:
    def __init__(self, state_dir: str) -> None:
        self.directory = os.path.join(state_dir, "grants")

    def _path(self, cgroup_dir: str) -> str:
        return os.path.join(self.directory, f"{cgroup_id(cgroup_dir)}.json")

    def get(self, cgroup_dir: str) -> List[Rule]:
        try:
            with open(self._path(cgroup_dir), encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return []
        rules = []
        for text in data.get("rules", []):
            with contextlib.suppress(Exception):
                rules.append(Rule.parse(text))
        return rules

    def _write(self, cgroup_dir: str, rules: Iterable[Rule]) -> None:
        rules = sort_rules(rules)
        path = self._path(cgroup_dir)
        if not rules:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        make_private_dir(self.directory)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"cgroup": cgroup_dir, "rules": [str(r) for r in rules]}, handle)
        os.replace(tmp, path)

    def add(self, cgroup_dir: str, rules: Iterable[Rule]) -> None:
        merged = RuleSet.of(self.get(cgroup_dir))
        for rule in rules:
            merged.add(rule)
        self._write(cgroup_dir, merged.rules())

    def remove(self, cgroup_dir: str, rules: Iterable[Rule]) -> None:
        kept = RuleSet.of(self.get(cgroup_dir))
        for rule in rules:
            kept.remove(rule)
        self._write(cgroup_dir, kept.rules())

    def collect_stale(self, cgroup_root: str) -> Set[int]:
        """Delete grant files whose cgroup is gone; return their ids."""
        return stale.collect_files(self.directory, ".json", cgroup_root)
