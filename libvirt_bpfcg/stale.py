"""Collecting per-cgroup state whose cgroup is gone, in one walk of the cgroup tree.

Pins (``<bpffs>/libvirt-bpfcg/<id>/``), lock files (``<state>/locks/<id>.lock``), runtime
grants (``<state>/grants/<id>.json``) and hotplug counters (``<state>/hotplug/<id>``) are all
keyed by the cgroup directory's inode. The hook's ``release`` runs this, so it imports only
``os``: no lxml, no bpf(2) — unlinking a pin is all it takes to free a pinned map.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterable, Set

PIN_SUBDIR = "libvirt-bpfcg"


def live_cgroup_ids(cgroup_root: str) -> Set[int]:
    ids: Set[int] = set()
    for dirpath, _dirs, _files in os.walk(cgroup_root):
        with contextlib.suppress(OSError):
            ids.add(os.stat(dirpath).st_ino)
    return ids


def _ids(directory: str, suffix: str = "") -> Set[int]:
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    found = set()
    for name in names:
        stem = name[:len(name) - len(suffix)] if suffix and name.endswith(suffix) else name
        if stem.isdigit() and (not suffix or name.endswith(suffix)):
            found.add(int(stem))
    return found


def remove_pin_dir(directory: str) -> None:
    """Unpin every object in a cgroup's pin directory, then drop the directory."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for name in os.listdir(directory):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def collect_files(directory: str, suffix: str, cgroup_root: str) -> Set[int]:
    """One kind only (``<directory>/<id><suffix>``); returns the ids removed."""
    found = _ids(directory, suffix)
    stale = found - live_cgroup_ids(cgroup_root) if found else set()
    for ident in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, f"{ident}{suffix}"))
    return stale


def collect(state_dir: str, bpffs: str, cgroup_root: str,
            alive: Iterable[int] | None = None) -> Dict[str, Set[int]]:
    """Remove the state of every cgroup that no longer exists; return what went, by kind.

    Every listing is read before the tree is walked, so state created for a cgroup made
    during the walk is never mistaken for stale.
    """
    places = {
        "pins": (os.path.join(bpffs, PIN_SUBDIR), ""),
        "locks": (os.path.join(state_dir, "locks"), ".lock"),
        "grants": (os.path.join(state_dir, "grants"), ".json"),
        "hotplug": (os.path.join(state_dir, "hotplug"), ""),
    }
    found = {kind: _ids(directory, suffix) for kind, (directory, suffix) in places.items()}
    if not any(found.values()):
        return {kind: set() for kind in places}
    live = set(alive) if alive is not None else live_cgroup_ids(cgroup_root)
    removed: Dict[str, Set[int]] = {}
    for kind, (directory, suffix) in places.items():
        removed[kind] = found[kind] - live
        for ident in removed[kind]:
            path = os.path.join(directory, f"{ident}{suffix}")
            if kind == "pins":
                remove_pin_dir(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    return removed
