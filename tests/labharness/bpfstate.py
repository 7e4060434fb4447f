"""Reading cgroup device-filter state with bpftool (JSON), decoded in libvirt's map format:
key = host-endian u64 major<<32 | minor (minor 0xffffffff = any), value = u32
access<<16 | type (type 1=b 2=c 3=a; access 1=m 2=r 4=w). See the lab README section 2."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import List, Tuple

from .host import run

ANY = 0xFFFFFFFF
_TYPES = {1: "b", 2: "c", 3: "a"}


@dataclass(frozen=True)
class AttachedProgram:
    id: int
    attach_type: str
    attach_flags: str  # "" when attached with flags 0 (exclusive), else e.g. "multi"
    name: str


def bpftool_json(*args: str) -> object:
    # an empty result is a bare newline, not "[]"
    return json.loads(run(["bpftool", "-j", *args]).stdout.strip() or "null")


def cgroup_programs(cgroup_dir: str) -> List[AttachedProgram]:
    """Programs attached directly to the cgroup (not inherited ones), any attach type."""
    out = bpftool_json("cgroup", "show", cgroup_dir) or []
    return [
        AttachedProgram(
            id=int(p["id"]),
            attach_type=str(p.get("attach_type", "")),
            attach_flags=str(p.get("attach_flags", "")),
            name=str(p.get("name", "")),
        )
        for p in out  # type: ignore[union-attr]
    ]


def device_programs(cgroup_dir: str) -> List[AttachedProgram]:
    return [p for p in cgroup_programs(cgroup_dir) if p.attach_type in ("device", "cgroup_device")]


def program_map_ids(prog_id: int) -> List[int]:
    info = bpftool_json("prog", "show", "id", str(prog_id))
    return [int(m) for m in info.get("map_ids", [])]  # type: ignore[union-attr]


def _bytes(field: object) -> bytes:
    """bpftool -j prints raw map keys/values as lists of "0x.." strings."""
    return bytes(int(b, 16) for b in field)  # type: ignore[union-attr]


def map_raw_entries(map_id: int) -> List[Tuple[bytes, bytes]]:
    dump = bpftool_json("map", "dump", "id", str(map_id)) or []
    return [(_bytes(e["key"]), _bytes(e["value"])) for e in dump]  # type: ignore[union-attr]


def decode_entry(key: bytes, value: bytes) -> str:
    """One libvirt map entry as "b 7:0 rw" ("*" for any major/minor)."""
    (k,) = struct.unpack("=Q", key)
    (v,) = struct.unpack("=I", value)
    major, minor = k >> 32, k & ANY
    dev_type, access = v & 0xFFFF, v >> 16
    perms = "".join(c for bit, c in ((2, "r"), (4, "w"), (1, "m")) if access & bit)
    return "{} {}:{} {}".format(
        _TYPES.get(dev_type, str(dev_type)),
        "*" if major == ANY else major,
        "*" if minor == ANY else minor,
        perms,
    )


def device_map_entries(map_id: int) -> List[str]:
    return sorted(decode_entry(k, v) for k, v in map_raw_entries(map_id))


def guest_filter(cgroup_dir: str) -> Tuple[AttachedProgram, List[str]] | None:
    """The single device program on the cgroup and its decoded map entries, or None when no
    program is attached. More than one program, or one without a map, is an error."""
    progs = device_programs(cgroup_dir)
    if not progs:
        return None
    if len(progs) != 1:
        raise AssertionError(f"{cgroup_dir}: {len(progs)} device programs attached: {progs}")
    maps = program_map_ids(progs[0].id)
    if not maps:
        raise AssertionError(f"{cgroup_dir}: program {progs[0].id} uses no map")
    return progs[0], device_map_entries(maps[0])
