"""Scratch cgroups for benchmarks: one parent per run under the cgroup2 root, removed at
exit even on failure (only what this process created)."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os

from libvirt_bpfcg.cgroup import cgroup2_root

_counter = itertools.count()
_parent = None


def parent() -> str:
    global _parent
    if _parent is None:
        _parent = os.path.join(cgroup2_root(), f"bpfcg-bench-{os.getpid()}")
        os.mkdir(_parent)
        atexit.register(_cleanup)
    return _parent


def new_cgroup() -> str:
    path = os.path.join(parent(), f"c{next(_counter)}")
    os.mkdir(path)
    return path


def _cleanup() -> None:
    if _parent is None or not os.path.isdir(_parent):
        return
    for dirpath, dirnames, _files in os.walk(_parent, topdown=False):
        for name in dirnames:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(dirpath, name))
    with contextlib.suppress(OSError):
        os.rmdir(_parent)
