"""What is attached to a cgroup, and which mode that puts us in (DESIGN §4).

* ``none``    — no device program on the cgroup itself: we may install our own;
* ``own``     — our program over our own base map;
* ``libvirt`` — libvirt's unnamed program over its hash map, or our overlay program whose
  first map is libvirt's (``overlay_installed`` tells which);
* ``foreign`` — anything else (ALLOW_MULTI/OVERRIDE attachments, several programs, an unknown
  program): we never widen it.

Detection reads only kernel state (program and map names and ids), so a fresh process finds
everything an earlier one installed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List

from .bpf import devprog
from .bpf import sys as bpf

MODE_NONE = "none"
MODE_OWN = "own"
MODE_LIBVIRT = "libvirt"
MODE_FOREIGN = "foreign"

OWNER_BPFCG = "bpfcg"
OWNER_LIBVIRT = "libvirt"
OWNER_OTHER = "other"


@dataclass
class MapView:
    id: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int

    @property
    def is_rule_map(self) -> bool:
        """libvirt's format: HASH, u64 key, u32 value."""
        return (self.type == bpf.BPF_MAP_TYPE_HASH and self.key_size == devprog.RULE_KEY_SIZE
                and self.value_size == devprog.RULE_VALUE_SIZE)


@dataclass
class ProgramView:
    id: int
    name: str
    attach_flags: int
    maps: List[MapView]
    owner: str = OWNER_OTHER

    def describe(self) -> str:
        name = self.name or "(unnamed)"
        flags = {0: "exclusive", bpf.BPF_F_ALLOW_OVERRIDE: "ALLOW_OVERRIDE",
                 bpf.BPF_F_ALLOW_MULTI: "ALLOW_MULTI"}.get(self.attach_flags,
                                                           f"flags {self.attach_flags:#x}")
        return f"program {self.id} {name} ({self.owner}, {flags})"

    def to_json(self) -> Dict[str, object]:
        return {"id": self.id, "name": self.name, "owner": self.owner,
                "attach_flags": self.attach_flags, "map_ids": [m.id for m in self.maps]}


@dataclass
class Detection:
    cgroup: str
    mode: str
    revision: int
    programs: List[ProgramView] = field(default_factory=list)
    base: MapView | None = None  # libvirt's map or our own base map
    overlay: MapView | None = None  # present only while our overlay program is attached
    denials: MapView | None = None
    reason: str = ""  # why foreign

    @property
    def overlay_installed(self) -> bool:
        return self.mode == MODE_LIBVIRT and self.overlay is not None

    @property
    def attached(self) -> ProgramView | None:
        return self.programs[0] if len(self.programs) == 1 else None


@contextlib.contextmanager
def opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        bpf.close(fd)


def map_view(map_id: int) -> MapView:
    with opened(bpf.map_get_fd_by_id(map_id)) as fd:
        info = bpf.map_info(fd)
    return MapView(info.id, info.name, info.type, info.key_size, info.value_size,
                   info.max_entries)


def program_view(prog_id: int, attach_flags: int) -> ProgramView:
    with opened(bpf.prog_get_fd_by_id(prog_id)) as fd:
        info = bpf.prog_info(fd)
    view = ProgramView(prog_id, info.name, attach_flags, [map_view(m) for m in info.map_ids])
    view.owner = classify(view)
    return view


def classify(view: ProgramView) -> str:
    names = [m.name for m in view.maps]
    if view.name == devprog.PROG_NAME and view.maps and view.maps[0].is_rule_map:
        return OWNER_BPFCG
    # libvirt's program: no name, exactly one map, unnamed, in its format (virbpf.c).
    if (not view.name and len(view.maps) == 1 and view.maps[0].is_rule_map
            and names == [""]):
        return OWNER_LIBVIRT
    return OWNER_OTHER


def detect(cgroup_dir: str) -> Detection:
    """Query the programs attached directly to ``cgroup_dir`` and decide the mode."""
    with opened(bpf.open_cgroup(cgroup_dir)) as cg_fd:
        query = bpf.prog_query(cg_fd, bpf.BPF_CGROUP_DEVICE)
    programs = []
    for prog_id in query.prog_ids:
        try:
            programs.append(program_view(prog_id, query.attach_flags))
        except bpf.BpfError:
            # Detached and freed between the query and now (libvirt swapped programs):
            # the caller re-detects under its lock; report what we could see.
            continue
    det = Detection(cgroup_dir, MODE_NONE, query.revision, programs)
    if not query.prog_ids:
        return det
    if len(programs) != 1 or len(query.prog_ids) != 1:
        det.mode = MODE_FOREIGN
        det.reason = "several device programs are attached: " + ", ".join(
            p.describe() for p in programs)
        return det
    prog = programs[0]
    if query.attach_flags != 0:
        det.mode = MODE_FOREIGN
        det.reason = f"{prog.describe()} is attached with ALLOW_MULTI/OVERRIDE; widening " \
                     "it is impossible (every program must allow)"
        return det
    if prog.owner == OWNER_LIBVIRT:
        det.mode, det.base = MODE_LIBVIRT, prog.maps[0]
        return det
    if prog.owner == OWNER_BPFCG:
        det.base = prog.maps[0]
        rest = prog.maps[1:]
        if rest and rest[-1].name == devprog.DENIAL_MAP_NAME:
            det.denials = rest.pop()
        if det.base.name == devprog.BASE_MAP_NAME and not rest:
            det.mode = MODE_OWN
            return det
        if rest and rest[0].name == devprog.OVERLAY_MAP_NAME and not det.base.name:
            det.mode, det.overlay = MODE_LIBVIRT, rest[0]
            return det
    det.mode = MODE_FOREIGN
    det.reason = f"{prog.describe()} is not libvirt's or ours; refusing to replace it"
    return det


@dataclass
class AncestorProgram:
    cgroup: str
    program: ProgramView


def ancestor_programs(cgroup_dir: str, stop_at: str) -> List[AncestorProgram]:
    """Device programs attached to the ancestors of ``cgroup_dir`` up to ``stop_at`` (the
    cgroup2 mount point, included). Each of them also has a say on every open below."""
    found: List[AncestorProgram] = []
    current = os.path.dirname(os.path.normpath(cgroup_dir))
    stop_at = os.path.normpath(stop_at)
    while current.startswith(stop_at):
        try:
            with opened(bpf.open_cgroup(current)) as fd:
                query = bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE)
        except (OSError, bpf.BpfError):
            query = None
        if query:
            for prog_id in query.prog_ids:
                with contextlib.suppress(bpf.BpfError):
                    found.append(AncestorProgram(current, program_view(prog_id,
                                                                       query.attach_flags)))
        if current == stop_at:
            break
        current = os.path.dirname(current)
    return found
