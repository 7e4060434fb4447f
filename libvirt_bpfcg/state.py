"""Where we keep what must outlive a process: per-cgroup locks and bpffs pins.

* Locks: ``<state_dir>/locks/<cgroup-id>.lock`` (flock), so the hook, the CLI and the
  watcher never interleave read-modify-write cycles on one cgroup's maps.
* Pins: ``<bpffs>/libvirt-bpfcg/<cgroup-id>/{overlay,denials}``. In libvirt mode libvirt's
  own map growth replaces our program without telling anyone; the pinned overlay and denial
  maps keep their contents, so a re-install continues where the old program left off.

The cgroup id is the cgroup directory's inode number: unique for the life of the cgroup and
free of the quoting problems of names (libvirt domain names may contain anything).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from typing import Iterator, Set

from . import stale
from .bpf import sys as bpf
from .errors import OperationError

DEFAULT_STATE_DIR = "/run/libvirt-bpfcg"
DEFAULT_BPFFS = "/sys/fs/bpf"
PIN_SUBDIR = stale.PIN_SUBDIR


def cgroup_id(cgroup_dir: str) -> int:
    try:
        return os.stat(cgroup_dir).st_ino
    except FileNotFoundError:
        raise OperationError(f"cgroup {cgroup_dir} does not exist (guest stopped?)") from None


def make_private_dir(path: str) -> str:
    """mkdir -p with mode 0700 (state is root-only); tightens an existing directory too."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    return path


@dataclass
class StateDirs:
    state_dir: str = DEFAULT_STATE_DIR
    bpffs: str = DEFAULT_BPFFS

    @contextlib.contextmanager
    def lock(self, cgroup_dir: str) -> Iterator[None]:
        """Exclusive per-cgroup lock (blocks until the holder releases it)."""
        lock_dir = make_private_dir(os.path.join(self.state_dir, "locks"))
        path = os.path.join(lock_dir, f"{cgroup_id(cgroup_dir)}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fd = bpf.move_off_zero(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- pins ------------------------------------------------------------------------------

    def pin_root(self, create: bool) -> str | None:
        root = os.path.join(self.bpffs, PIN_SUBDIR)
        if create:
            bpf.ensure_bpffs(self.bpffs)
            return make_private_dir(root)
        return root if os.path.isdir(root) else None

    def pin_dir(self, cgroup_dir: str, create: bool) -> str | None:
        root = self.pin_root(create)
        if root is None:
            return None
        path = os.path.join(root, str(cgroup_id(cgroup_dir)))
        if create:
            return make_private_dir(path)
        return path if os.path.isdir(path) else None

    def get_pinned(self, cgroup_dir: str, name: str) -> int | None:
        """fd of a pinned map, or None when there is none."""
        directory = self.pin_dir(cgroup_dir, create=False)
        if directory is None or not os.path.exists(os.path.join(directory, name)):
            return None
        return bpf.obj_get(os.path.join(directory, name))

    def pin(self, cgroup_dir: str, name: str, fd: int) -> None:
        """Pin ``fd`` as ``name``, replacing an older pin of that name."""
        directory = self.pin_dir(cgroup_dir, create=True)
        assert directory is not None
        path = os.path.join(directory, name)
        tmp = path + "_new"  # bpffs refuses names with a dot (EPERM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        bpf.obj_pin(fd, tmp)
        os.rename(tmp, path)  # atomic on bpffs: readers see the old or the new map

    def unpin_cgroup_id(self, ident: int) -> None:
        root = self.pin_root(create=False)
        if root is not None:
            stale.remove_pin_dir(os.path.join(root, str(ident)))

    def collect_stale_pins(self, cgroup_root: str) -> Set[int]:
        """Drop the pins — and the locks, grants and hotplug counters — of cgroups that no
        longer exist (one walk; see stale.collect). Returns the ids whose pins went."""
        return stale.collect(self.state_dir, self.bpffs, cgroup_root)["pins"]
