"""The cgroup device programs: ours, a byte-identical clone of libvirt's, and a linear one.

Context (struct bpf_cgroup_dev_ctx, all u32): ``access_type`` @0 = ``access << 16 | type``,
``major`` @4, ``minor`` @8. Return 1 allows the open/mknod, 0 makes it fail with EPERM.

**Ours** (:func:`build_device_program`) has libvirt's lookup semantics exactly (DESIGN.md §3):
for each map in order (the base map first, the overlay second), keys ``major:minor``,
``major:*``, ``*:minor``, ``*:*``; allow iff ``(access_type & value) == access_type``; a key
that is present but fails the check falls through to the next key. The four keys are built
once on the stack and every lookup points at one of them.

Contract: the kernel lists a program's ``map_ids`` in the order the instructions first
reference them, and libvirt re-detects ``map_ids[0]`` as *its* map. The maps are therefore
referenced in exactly the order given: ``map_fds[0]``, ``map_fds[1]``, ..., then the denial map.

**Denials** (optional): when nothing allows, the program counts the refusal in a HASH map
keyed by ``major << 32 | minor`` with a 24-byte value ``{u64 count; u64 last_ns;
u32 last_access_type; u32 pad}``, ``last_ns`` from bpf_ktime_get_boot_ns (CLOCK_BOOTTIME).
Kernels that refuse that variant make :func:`denials_supported` answer False.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

from ..rules import ANY, TYPE_BITS, Rule, access_bits
from . import sys as bpf
from .asm import (
    ADD,
    AND,
    DW,
    FP,
    FUNC_KTIME_GET_BOOT_NS,
    FUNC_MAP_LOOKUP_ELEM,
    FUNC_MAP_UPDATE_ELEM,
    JEQ,
    JNE,
    LSH,
    OR,
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    RSH,
    Program,
    W,
)

PROG_NAME = "bpfcg_dev"
BASE_MAP_NAME = "bpfcg_base"
OVERLAY_MAP_NAME = "bpfcg_overlay"
DENIAL_MAP_NAME = "bpfcg_denials"
DENIAL_KEY_SIZE = 8
DENIAL_VALUE_SIZE = 24
DENIAL_MAP_SIZE = 256
LINEAR_PROG_NAME = "bpfcg_linear"

RULE_KEY_SIZE = 8
RULE_VALUE_SIZE = 4
LIBVIRT_MAP_SIZE = 64  # VIR_CGROUP_V2_INITIAL_BPF_MAP_SIZE

# Context offsets (struct bpf_cgroup_dev_ctx).
_CTX_ACCESS_TYPE = 0
_CTX_MAJOR = 4
_CTX_MINOR = 8

# Stack layout of our program (offsets from the frame pointer r10).
_KEY_SLOTS = (-8, -16, -24, -32)  # major:minor, major:*, *:minor, *:* (libvirt's order)
_EXACT_KEY = -8  # also the denial map's key
_DENIAL_VALUE = -56  # 24 bytes: count @-56, last_ns @-48, access_type @-40, pad @-36

_BPF_NOEXIST = 1  # flag for bpf_map_update_elem inside the program


@dataclass(frozen=True)
class Denial:
    """One denial map entry."""

    major: int
    minor: int
    count: int
    last_ns: int  # CLOCK_BOOTTIME nanoseconds of the latest refusal
    last_access_type: int  # ctx access_type: access << 16 | type

    @property
    def type_letter(self) -> str:
        return {1: "b", 2: "c"}.get(self.last_access_type & 0xFFFF, "?")

    @property
    def access_bits(self) -> int:
        return self.last_access_type >> 16


def denial_value_bytes(count: int, last_ns: int, last_access_type: int) -> bytes:
    return struct.pack("=QQII", count, last_ns, last_access_type, 0)


def parse_denial(key: bytes, value: bytes) -> Denial:
    full_key = bpf.parse_key(key)
    count, last_ns, access_type, _pad = struct.unpack("=QQII", value)
    return Denial(full_key >> 32, full_key & 0xFFFFFFFF, count, last_ns, access_type)


def read_denials(denial_fd: int) -> Dict[Tuple[int, int], Denial]:
    """Every entry of a denial map, by (major, minor)."""
    result: Dict[Tuple[int, int], Denial] = {}
    for key, value in bpf.map_items(denial_fd, DENIAL_KEY_SIZE, DENIAL_VALUE_SIZE):
        denial = parse_denial(key, value)
        result[(denial.major, denial.minor)] = denial
    return result


# --------------------------------------------------------------------------------------------
# Our program


def build_device_program(map_fds: Sequence[int], denial_fd: int | None = None) -> bytes:
    """Instructions of our device program over ``map_fds`` (base first), optionally recording
    denials in ``denial_fd``. See the module docstring for semantics and map order."""
    if not map_fds:
        raise ValueError("the device program needs at least one rule map")
    prog = Program()
    _emit_prologue(prog)
    for map_index, map_fd in enumerate(map_fds):
        for key_index, key_slot in enumerate(_KEY_SLOTS):
            _emit_lookup(prog, map_fd, key_slot, f"next_m{map_index}_k{key_index}")
    if denial_fd is not None:
        _emit_denial_record(prog, denial_fd)
    prog.mov64_imm(R0, 0).exit()
    prog.label("allow").mov64_imm(R0, 1).exit()
    return prog.assemble()


def _emit_prologue(prog: Program) -> None:
    """r6 = access_type; the four lookup keys on the stack (computed once, shared by maps)."""
    prog.ldx(W, R6, R1, _CTX_ACCESS_TYPE)
    prog.ldx(W, R2, R1, _CTX_MAJOR)
    prog.ldx(W, R3, R1, _CTX_MINOR)  # 32-bit loads zero-extend
    prog.alu64_imm(LSH, R2, 32)  # r2 = major << 32
    # major:minor
    prog.mov64_reg(R4, R2).alu64_reg(OR, R4, R3).stx(DW, FP, _KEY_SLOTS[0], R4)
    # major:* — a 32-bit mov of -1 zero-extends to 0x00000000ffffffff
    prog.mov32_imm(R4, -1).alu64_reg(OR, R4, R2).stx(DW, FP, _KEY_SLOTS[1], R4)
    # *:minor — a 64-bit mov of -1 sign-extends to all ones
    prog.mov64_imm(R4, -1).alu64_imm(LSH, R4, 32).alu64_reg(OR, R4, R3)
    prog.stx(DW, FP, _KEY_SLOTS[2], R4)
    # *:* — a DW store of imm -1 sign-extends
    prog.st(DW, FP, _KEY_SLOTS[3], -1)


def _emit_lookup(prog: Program, map_fd: int, key_slot: int, next_label: str) -> None:
    """value = lookup(map, key); if value && (access & *value) == access: goto allow."""
    prog.ld_map_fd(R1, map_fd)
    prog.mov64_reg(R2, FP).alu64_imm(ADD, R2, key_slot)
    prog.call(FUNC_MAP_LOOKUP_ELEM)
    prog.jmp_imm(JEQ, R0, 0, next_label)
    prog.ldx(W, R1, R0, 0)
    prog.alu64_reg(AND, R1, R6)
    prog.jmp_reg(JEQ, R1, R6, "allow")
    prog.label(next_label)


def _emit_denial_record(prog: Program, denial_fd: int) -> None:
    """Count this refusal: existing entry -> atomic add + stores; else insert (NOEXIST), and if
    another CPU inserted first, look up again and atomic add."""
    _emit_denial_lookup(prog, denial_fd)
    prog.jmp_imm(JEQ, R0, 0, "denial_insert")
    prog.mov64_reg(R7, R0)  # value pointer survives the helper call below
    prog.mov64_imm(R1, 1).atomic_add64(R7, 0, R1)
    prog.call(FUNC_KTIME_GET_BOOT_NS)
    prog.stx(DW, R7, 8, R0)
    prog.stx(W, R7, 16, R6)
    prog.ja("deny")

    prog.label("denial_insert")
    prog.call(FUNC_KTIME_GET_BOOT_NS)
    prog.st(DW, FP, _DENIAL_VALUE, 1)
    prog.stx(DW, FP, _DENIAL_VALUE + 8, R0)
    prog.stx(W, FP, _DENIAL_VALUE + 16, R6)
    prog.st(W, FP, _DENIAL_VALUE + 20, 0)  # the verifier wants every byte passed initialised
    prog.ld_map_fd(R1, denial_fd)
    prog.mov64_reg(R2, FP).alu64_imm(ADD, R2, _EXACT_KEY)
    prog.mov64_reg(R3, FP).alu64_imm(ADD, R3, _DENIAL_VALUE)
    prog.mov64_imm(R4, _BPF_NOEXIST)
    prog.call(FUNC_MAP_UPDATE_ELEM)
    prog.jmp_imm(JEQ, R0, 0, "deny")

    _emit_denial_lookup(prog, denial_fd)  # lost the insert race: the entry exists now
    prog.jmp_imm(JEQ, R0, 0, "deny")
    prog.mov64_imm(R1, 1).atomic_add64(R0, 0, R1)
    prog.label("deny")


def _emit_denial_lookup(prog: Program, denial_fd: int) -> None:
    prog.ld_map_fd(R1, denial_fd)
    prog.mov64_reg(R2, FP).alu64_imm(ADD, R2, _EXACT_KEY)
    prog.call(FUNC_MAP_LOOKUP_ELEM)


def load_device_program(map_fds: Sequence[int], denial_fd: int | None = None,
                        name: str = PROG_NAME) -> int:
    """Load our program -> fd (CGROUP_DEVICE, GPL, named, expected_attach_type set)."""
    insns = build_device_program(map_fds, denial_fd)
    return bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, insns, "GPL", name,
                         bpf.BPF_CGROUP_DEVICE)


def create_rule_map(name: str, max_entries: int) -> int:
    """A libvirt-format map (HASH u64 -> u32, preallocated) with our name."""
    return bpf.map_create(bpf.BPF_MAP_TYPE_HASH, RULE_KEY_SIZE, RULE_VALUE_SIZE, max_entries,
                          name)


def create_denial_map(max_entries: int = DENIAL_MAP_SIZE) -> int:
    return bpf.map_create(bpf.BPF_MAP_TYPE_HASH, DENIAL_KEY_SIZE, DENIAL_VALUE_SIZE, max_entries,
                          DENIAL_MAP_NAME)


_probe_lock = threading.Lock()
_denials_supported: bool | None = None


def denials_supported() -> bool:
    """Can this kernel load the denial-recording variant? Probed once per process with
    throwaway maps; False means: use the plain program."""
    global _denials_supported
    with _probe_lock:
        if _denials_supported is None:
            result = _probe_denials()
            if result is None:
                return False  # could not even create maps: not a kernel answer, do not cache
            _denials_supported = result
        return _denials_supported


def _probe_denials() -> bool | None:
    fds = []
    try:
        fds.append(create_rule_map("", 1))
        fds.append(create_denial_map(1))
    except bpf.BpfError:
        for fd in fds:
            bpf.close(fd)
        return None
    try:
        fds.append(load_device_program(fds[:1], fds[1], name="bpfcg_probe"))
        return True
    except bpf.BpfError:
        return False
    finally:
        for fd in fds:
            bpf.close(fd)


def _reset_denials_probe() -> None:
    """For tests."""
    global _denials_supported
    with _probe_lock:
        _denials_supported = None


# --------------------------------------------------------------------------------------------
# libvirt's program (libvirt 9.0, src/util/vircgroupv2devices.c: virCgroupV2DevicesLoadProg)


def build_libvirt_program(map_fd: int) -> bytes:
    """A byte-identical copy of libvirt's 69-slot program (clang output, hand-transcribed by
    libvirt). Kept instruction for instruction, including its reloads from the context."""
    prog = Program()
    prog.mov64_reg(R6, R1)
    # exact key
    prog.ldx(W, R1, R6, _CTX_MINOR)
    prog.ldx(W, R2, R6, _CTX_MAJOR)
    prog.alu64_imm(LSH, R2, 32)
    prog.alu64_reg(OR, R2, R1)
    _libvirt_lookup(prog, map_fd, R2, "LBB0_2")
    # major:*
    prog.label("LBB0_2")
    prog.ldx(W, R1, R6, _CTX_MAJOR)
    prog.alu64_imm(LSH, R1, 32)
    prog.ld_imm64(R2, 0xFFFFFFFF)
    prog.alu64_reg(OR, R1, R2)
    _libvirt_lookup(prog, map_fd, R1, "LBB0_4")
    # *:minor
    prog.label("LBB0_4")
    prog.ldx(W, R1, R6, _CTX_MINOR)
    prog.ld_imm64(R2, 0xFFFFFFFF00000000)
    prog.alu64_reg(OR, R1, R2)
    _libvirt_lookup(prog, map_fd, R1, "LBB0_6")
    # *:*
    prog.label("LBB0_6")
    prog.mov64_imm(R1, -1)
    _libvirt_lookup(prog, map_fd, R1, "LBB0_8")
    prog.label("LBB0_8")
    prog.mov64_imm(R0, 0)
    prog.label("LBB0_9")
    prog.exit()
    return prog.assemble()


def _libvirt_lookup(prog: Program, map_fd: int, key_reg: int, next_label: str) -> None:
    prog.stx(DW, FP, -8, key_reg)
    prog.mov64_reg(R2, FP).alu64_imm(ADD, R2, -8)
    prog.ld_map_fd(R1, map_fd)
    prog.call(FUNC_MAP_LOOKUP_ELEM)
    prog.mov64_reg(R1, R0)
    prog.jmp_imm(JEQ, R1, 0, next_label)
    prog.mov64_imm(R0, 1)  # r0 = 1 before the check: the allow path exits with it
    prog.ldx(W, R2, R6, _CTX_ACCESS_TYPE)
    prog.ldx(W, R1, R1, 0)
    prog.alu64_reg(AND, R1, R2)
    prog.jmp_reg(JEQ, R1, R2, "LBB0_9")


def load_libvirt_program(map_fd: int) -> int:
    """Load it the way libvirt does: unnamed, no expected_attach_type, GPL."""
    return bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, build_libvirt_program(map_fd), "GPL")


def create_libvirt_map(max_entries: int = LIBVIRT_MAP_SIZE) -> int:
    """libvirt's map: HASH u64 -> u32, unnamed, flags 0."""
    return bpf.map_create(bpf.BPF_MAP_TYPE_HASH, RULE_KEY_SIZE, RULE_VALUE_SIZE, max_entries)


# --------------------------------------------------------------------------------------------
# Linear program (what systemd and runc generate: one compare block per rule, no map)


def build_linear_program(rules: Sequence[Rule]) -> bytes:
    """Allow iff some rule covers the request (same answer as libvirt's lookup over a map
    holding these rules, one per key). The program must be regenerated for every change."""
    prog = Program()
    prog.ldx(W, R2, R1, _CTX_ACCESS_TYPE)
    prog.mov64_reg(R3, R2)
    prog.alu64_imm(AND, R2, 0xFFFF)  # r2 = type
    prog.alu64_imm(RSH, R3, 16)  # r3 = requested access
    prog.ldx(W, R4, R1, _CTX_MAJOR)
    prog.ldx(W, R5, R1, _CTX_MINOR)
    for index, rule in enumerate(rules):
        if _matches_everything(rule):
            # The verifier refuses unreachable instructions: nothing may follow this block.
            prog.mov64_imm(R0, 1).exit()
            return prog.assemble()
        _emit_linear_rule(prog, rule, f"rule{index + 1}")
    prog.mov64_imm(R0, 0).exit()
    return prog.assemble()


def _matches_everything(rule: Rule) -> bool:
    return (rule.type == "a" and access_bits(rule.access) == 0x7
            and rule.major in (None, ANY) and rule.minor in (None, ANY))


def _emit_linear_rule(prog: Program, rule: Rule, next_label: str) -> None:
    # 32-bit compares: the context fields are u32, and a 64-bit compare would sign-extend an
    # immediate >= 2**31.
    if rule.type != "a":
        prog.jmp32_imm(JNE, R2, TYPE_BITS[rule.type], next_label)
    granted = access_bits(rule.access)
    if granted != 0x7:
        # requested access must be a subset of the granted access
        prog.mov64_reg(R1, R3).alu64_imm(AND, R1, ~granted & 0x7)
        prog.jmp32_imm(JNE, R1, 0, next_label)
    if rule.major is not None and rule.major != ANY:
        prog.jmp32_imm(JNE, R4, rule.major, next_label)
    if rule.minor is not None and rule.minor != ANY:
        prog.jmp32_imm(JNE, R5, rule.minor, next_label)
    prog.mov64_imm(R0, 1).exit()
    prog.label(next_label)


def load_linear_program(rules: Sequence[Rule], name: str = LINEAR_PROG_NAME) -> int:
    return bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, build_linear_program(rules), "GPL",
                         name, bpf.BPF_CGROUP_DEVICE)
