"""Fixtures for the real libvirtd + QEMU lab (see tests/labharness/).

* ``lab``: a session-wide lab whose libvirtd attaches its native BPF device filter.
* ``lab_nobpf``: a session-wide lab whose libvirtd cannot use bpf(2) (LD_PRELOAD shim), so
  its guests start in their own cgroup with no filter: "own mode" for our tool.
* ``lab_guest``: a factory that defines and starts guests and destroys and undefines them
  (and frees the loop devices it made) after the test.

Each lab starts on first use and is torn down at the end of the session; the harness also
tears it down at interpreter exit and on SIGTERM/SIGHUP, and the next lab sweeps labs whose
test process was killed. A lab that cannot come up fails the test (never skips): CI must not
pass without having run these tests. Mark tests that use them with ``pytest.mark.lab``.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Sequence, Tuple

import pytest
from labharness import Lab, LabError

_guest_numbers = itertools.count(1)


def bring_up_lab(**options: object) -> Lab:
    """A lab that is up, or pytest.fail with the reason (no root, no KVM nor TCG, packages
    missing and uninstallable, libvirtd failing; the message has the log tails)."""
    lab = Lab()
    try:
        lab.up(**options)  # type: ignore[arg-type]
    except LabError as exc:
        pytest.fail(f"the libvirt lab could not come up: {exc}", pytrace=False)
    return lab


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """libvirtd with its native cgroup v2 BPF device filter, default qemu.conf."""
    instance = bring_up_lab()
    try:
        yield instance
    finally:
        instance.down()


@pytest.fixture(scope="session")
def lab_nobpf() -> Iterator[Lab]:
    """libvirtd whose bpf(2) fails: guests get their own cgroup and no device filter."""
    instance = bring_up_lab(libvirtd_preload_nobpf=True)
    try:
        yield instance
    finally:
        instance.down()


@pytest.fixture
def hooked_lab(lab: Lab) -> Iterator[Lab]:
    """The native-filter lab with our hook installed (removed after the test)."""
    from lab_cli import install_hook

    install_hook(lab)
    yield lab
    lab.remove_hook()


@pytest.fixture
def hooked_nobpf(lab_nobpf: Lab) -> Iterator[Lab]:
    """The bpf-less lab (own mode) with our hook installed (removed after the test)."""
    from lab_cli import install_hook

    install_hook(lab_nobpf)
    yield lab_nobpf
    lab_nobpf.remove_hook()


@dataclass
class LabGuest:
    lab: Lab
    name: str
    disks: List[str]  # loop devices, vda first
    xml: str
    own_loops: List[str] = field(default_factory=list)  # made by the factory, freed after

    @property
    def qemu_pid(self) -> int:
        return self.lab.qemu_pid(self.name)

    @property
    def cgroup(self) -> str:
        """The guest cgroup directory, host view."""
        return self.lab.guest_cgroup_host(self.name)

    def open_in_cgroup(self, paths_with_flags: Sequence[Tuple[str, int]]) -> List[int]:
        """errno of each open by a process in the guest cgroup (0 = opened)."""
        return self.lab.in_guest_cgroup_open(self.name, paths_with_flags)


GuestFactory = Callable[..., LabGuest]


@pytest.fixture
def lab_guest(request: pytest.FixtureRequest) -> Iterator[GuestFactory]:
    """make(disks=None, *, lab=None, name=None, n_disks=1, extra_devices_xml="",
    metadata_xml="", start=True) -> LabGuest.

    disks: loop devices to use (vda first); by default n_disks new 32 MiB loop devices.
    lab: the Lab to use, default the ``lab`` fixture (pass ``lab_nobpf`` for own mode).
    """
    made: List[LabGuest] = []

    def make(
        disks: Sequence[str] | None = None,
        *,
        lab: Lab | None = None,
        name: str | None = None,
        n_disks: int = 1,
        extra_devices_xml: str = "",
        metadata_xml: str = "",
        start: bool = True,
    ) -> LabGuest:
        target = lab if lab is not None else request.getfixturevalue("lab")
        if not target.libvirtd_alive():  # an earlier test stopped or killed it
            target.start_libvirtd()
        name = name or f"guest{next(_guest_numbers)}"
        own = [] if disks is not None else [
            target.new_loop(f"{name}-d{i}") for i in range(n_disks)
        ]
        disk_list = list(disks) if disks is not None else own
        xml = target.guest_xml(name, disk_list, extra_devices_xml, metadata_xml)
        guest = LabGuest(target, name, disk_list, xml, own)
        made.append(guest)
        target.define(xml)
        if start:
            target.start(name)
        return guest

    yield make
    problems = []
    for guest in reversed(made):
        problems += _remove_guest(guest)
    if problems:
        pytest.fail("lab_guest teardown: " + "; ".join(problems), pytrace=False)


def _remove_guest(guest: LabGuest) -> List[str]:
    lab = guest.lab
    if not lab.lab_dir:
        return []  # the lab itself is gone; its down() removed everything
    problems = []
    try:
        if not lab.libvirtd_alive():  # a test stopped or killed it
            lab.start_libvirtd()
        if guest.name in lab.virsh("list", "--name").stdout.split():
            lab.destroy(guest.name)
        proc = lab.virsh("undefine", guest.name, "--managed-save", check=False)
        if proc.returncode != 0 and "not found" not in proc.stderr:
            problems.append(f"undefine {guest.name}: {proc.stderr.strip()}")
        for device in guest.own_loops:
            lab.free_loop(device)
    except LabError as exc:
        problems.append(f"{guest.name}: {exc}")
    return problems


def lab_timings(lab_instance: Lab) -> str:
    """One line per operation: count, mean and max seconds (for reports)."""
    lines = []
    for key, values in sorted(lab_instance.timings.items()):
        lines.append(f"{key}: n={len(values)} mean={sum(values) / len(values):.3f}s "
                     f"max={max(values):.3f}s")
    return os.linesep.join(lines)


__all__ = ["lab", "lab_nobpf", "hooked_lab", "hooked_nobpf", "lab_guest", "LabGuest",
           "bring_up_lab", "lab_timings"]
