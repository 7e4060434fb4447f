"""A small eBPF assembler with symbolic labels, and a disassembler for golden tests.

Programs are written as a sequence of builder calls on :class:`Program`; jumps name a label
instead of an offset, and :meth:`Program.assemble` resolves every label in one pass (after one
pass that places them), so nobody counts instructions by hand (the model is cilium/ebpf's asm
package). An unknown or duplicate label is an :class:`AsmError` at assemble time.

Encoding (include/uapi/linux/bpf.h, struct bpf_insn): u8 code; u4 dst_reg, u4 src_reg (dst in
the low nibble on little-endian hosts); s16 off; s32 imm. ``ld_imm64`` takes two slots, the
second carrying the upper 32 bits in its imm.

:func:`disassemble` prints the kernel's / bpftool's xlated syntax (``r2 = *(u32 *)(r1 +4)``,
``if r0 == 0x0 goto +3``), with map fds replaced by ``map[N]`` numbered by first appearance so
that golden text does not depend on fd numbers.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

# Registers.
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FP = R10  # read-only frame pointer

# Instruction classes.
CLASS_LD = 0x00
CLASS_LDX = 0x01
CLASS_ST = 0x02
CLASS_STX = 0x03
CLASS_ALU = 0x04
CLASS_JMP = 0x05
CLASS_JMP32 = 0x06
CLASS_ALU64 = 0x07

# Sizes (for ld/st), modes.
W = 0x00  # u32
H = 0x08  # u16
B = 0x10  # u8
DW = 0x18  # u64
MODE_IMM = 0x00
MODE_MEM = 0x60
MODE_ATOMIC = 0xC0

# Source operand.
SRC_K = 0x00  # immediate
SRC_X = 0x08  # register

# ALU operations.
ADD = 0x00
SUB = 0x10
MUL = 0x20
DIV = 0x30
OR = 0x40
AND = 0x50
LSH = 0x60
RSH = 0x70
NEG = 0x80
MOD = 0x90
XOR = 0xA0
MOV = 0xB0
ARSH = 0xC0
END = 0xD0

# Jump operations.
JA = 0x00
JEQ = 0x10
JGT = 0x20
JGE = 0x30
JSET = 0x40
JNE = 0x50
JSGT = 0x60
JSGE = 0x70
CALL = 0x80
EXIT = 0x90
JLT = 0xA0
JLE = 0xB0
JSLT = 0xC0
JSLE = 0xD0

# ld_imm64 src_reg meaning "imm is a map fd" (the kernel swaps in the map pointer).
PSEUDO_MAP_FD = 1

# Helper function ids used in this project (include/uapi/linux/bpf.h, __BPF_FUNC_MAPPER).
FUNC_MAP_LOOKUP_ELEM = 1
FUNC_MAP_UPDATE_ELEM = 2
FUNC_MAP_DELETE_ELEM = 3
FUNC_KTIME_GET_NS = 5
FUNC_KTIME_GET_BOOT_NS = 125

HELPER_NAMES: Dict[int, str] = {
    FUNC_MAP_LOOKUP_ELEM: "bpf_map_lookup_elem",
    FUNC_MAP_UPDATE_ELEM: "bpf_map_update_elem",
    FUNC_MAP_DELETE_ELEM: "bpf_map_delete_elem",
    FUNC_KTIME_GET_NS: "bpf_ktime_get_ns",
    FUNC_KTIME_GET_BOOT_NS: "bpf_ktime_get_boot_ns",
}

_LD_IMM64 = CLASS_LD | DW | MODE_IMM
_SIZE_NAMES = {B: "u8", H: "u16", W: "u32", DW: "u64"}
_ALU_SYMBOLS = {
    ADD: "+=", SUB: "-=", MUL: "*=", DIV: "/=", OR: "|=", AND: "&=", LSH: "<<=", RSH: ">>=",
    MOD: "%=", XOR: "^=", MOV: "=", ARSH: "s>>=",
}
_JMP_SYMBOLS = {
    JEQ: "==", JGT: ">", JGE: ">=", JSET: "&", JNE: "!=", JSGT: "s>", JSGE: "s>=",
    JLT: "<", JLE: "<=", JSLT: "s<", JSLE: "s<=",
}
_ATOMIC_SYMBOLS = {ADD: "+=", OR: "|=", AND: "&=", XOR: "^="}
_LITTLE_ENDIAN = sys.byteorder == "little"


class AsmError(ValueError):
    """A program that cannot be encoded: bad operand, unknown or duplicate label."""


# --------------------------------------------------------------------------------------------
# One instruction


@dataclass(frozen=True)
class Insn:
    """One instruction. ``imm`` of an ld_imm64 holds the full 64-bit value; a jump either names
    a ``target`` label (resolved by :meth:`Program.assemble`) or carries a raw ``off``."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: Union[str, None] = None

    @property
    def is_wide(self) -> bool:
        return self.code == _LD_IMM64

    @property
    def slots(self) -> int:
        return 2 if self.is_wide else 1

    @property
    def is_jump(self) -> bool:
        cls = self.code & 0x07
        op = self.code & 0xF0
        return cls in (CLASS_JMP, CLASS_JMP32) and op not in (CALL, EXIT)

    def encode(self, off: Union[int, None] = None) -> bytes:
        """The instruction's 8 (or 16) bytes; ``off`` overrides the stored offset."""
        off = self.off if off is None else off
        if not -0x8000 <= off <= 0x7FFF:
            raise AsmError(f"offset {off} does not fit in 16 bits")
        regs = (self.src << 4 | self.dst) if _LITTLE_ENDIAN else (self.dst << 4 | self.src)
        if self.is_wide:
            value = self.imm & 0xFFFFFFFFFFFFFFFF
            return (struct.pack("=BBhi", self.code, regs, off, _s32(value & 0xFFFFFFFF))
                    + struct.pack("=BBhi", 0, 0, 0, _s32(value >> 32)))
        return struct.pack("=BBhi", self.code, regs, off, _s32(self.imm))


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _check_reg(reg: int, what: str = "register") -> int:
    if not isinstance(reg, int) or not 0 <= reg <= 10:
        raise AsmError(f"bad {what} {reg!r}: use R0..R10")
    return reg


def _check_imm32(imm: int) -> int:
    """Accept a signed or unsigned 32-bit value (0xffffffff and -1 are the same bits)."""
    if not isinstance(imm, int) or not -(1 << 31) <= imm < (1 << 32):
        raise AsmError(f"immediate {imm!r} does not fit in 32 bits")
    return _s32(imm)


def _check_off(off: int) -> int:
    if not isinstance(off, int) or not -0x8000 <= off <= 0x7FFF:
        raise AsmError(f"offset {off!r} does not fit in 16 bits")
    return off


def _check_size(size: int) -> int:
    if size not in _SIZE_NAMES:
        raise AsmError(f"bad size {size!r}: use B, H, W or DW")
    return size


# --------------------------------------------------------------------------------------------
# Program builder


@dataclass(frozen=True)
class _Label:
    name: str


class Program:
    """An instruction list with labels. Builder methods return ``self`` so they chain."""

    def __init__(self) -> None:
        self._items: List[Union[Insn, _Label]] = []

    def __len__(self) -> int:
        """Number of 8-byte slots (ld_imm64 counts two)."""
        return sum(item.slots for item in self._items if isinstance(item, Insn))

    def label(self, name: str) -> Program:
        """Mark the position of the next instruction."""
        if not name or not isinstance(name, str):
            raise AsmError(f"bad label {name!r}")
        self._items.append(_Label(name))
        return self

    def emit(self, insn: Insn) -> Program:
        self._items.append(insn)
        return self

    # --- ALU -----------------------------------------------------------------------------

    def alu64_imm(self, op: int, dst: int, imm: int) -> Program:
        return self.emit(Insn(CLASS_ALU64 | op | SRC_K, _check_reg(dst), 0, 0, _check_imm32(imm)))

    def alu64_reg(self, op: int, dst: int, src: int) -> Program:
        return self.emit(Insn(CLASS_ALU64 | op | SRC_X, _check_reg(dst), _check_reg(src)))

    def alu32_imm(self, op: int, dst: int, imm: int) -> Program:
        return self.emit(Insn(CLASS_ALU | op | SRC_K, _check_reg(dst), 0, 0, _check_imm32(imm)))

    def alu32_reg(self, op: int, dst: int, src: int) -> Program:
        return self.emit(Insn(CLASS_ALU | op | SRC_X, _check_reg(dst), _check_reg(src)))

    def mov64_imm(self, dst: int, imm: int) -> Program:
        """dst = imm, sign-extended to 64 bits (so -1 is all ones)."""
        return self.alu64_imm(MOV, dst, imm)

    def mov64_reg(self, dst: int, src: int) -> Program:
        return self.alu64_reg(MOV, dst, src)

    def mov32_imm(self, dst: int, imm: int) -> Program:
        """w-dst = imm, zero-extended (so -1 gives 0x00000000ffffffff)."""
        return self.alu32_imm(MOV, dst, imm)

    def mov32_reg(self, dst: int, src: int) -> Program:
        return self.alu32_reg(MOV, dst, src)

    # --- memory --------------------------------------------------------------------------

    def ldx(self, size: int, dst: int, src: int, off: int) -> Program:
        """dst = *(size *)(src + off)"""
        code = CLASS_LDX | _check_size(size) | MODE_MEM
        return self.emit(Insn(code, _check_reg(dst), _check_reg(src), _check_off(off)))

    def stx(self, size: int, dst: int, off: int, src: int) -> Program:
        """*(size *)(dst + off) = src"""
        code = CLASS_STX | _check_size(size) | MODE_MEM
        return self.emit(Insn(code, _check_reg(dst), _check_reg(src), _check_off(off)))

    def st(self, size: int, dst: int, off: int, imm: int) -> Program:
        """*(size *)(dst + off) = imm (sign-extended for DW)"""
        code = CLASS_ST | _check_size(size) | MODE_MEM
        return self.emit(Insn(code, _check_reg(dst), 0, _check_off(off), _check_imm32(imm)))

    def atomic_add(self, size: int, dst: int, off: int, src: int) -> Program:
        """lock *(size *)(dst + off) += src  (BPF_STX | BPF_ATOMIC, imm BPF_ADD; W or DW)"""
        if size not in (W, DW):
            raise AsmError("atomic operations take W or DW")
        code = CLASS_STX | size | MODE_ATOMIC
        return self.emit(Insn(code, _check_reg(dst), _check_reg(src), _check_off(off), ADD))

    def atomic_add64(self, dst: int, off: int, src: int) -> Program:
        return self.atomic_add(DW, dst, off, src)

    def ld_imm64(self, dst: int, imm: int) -> Program:
        """dst = imm (full 64-bit value, two slots)."""
        if not isinstance(imm, int) or not -(1 << 63) <= imm < (1 << 64):
            raise AsmError(f"immediate {imm!r} does not fit in 64 bits")
        return self.emit(Insn(_LD_IMM64, _check_reg(dst), 0, 0, imm & 0xFFFFFFFFFFFFFFFF))

    def ld_map_fd(self, dst: int, fd: int) -> Program:
        """dst = map (ld_imm64 with src_reg BPF_PSEUDO_MAP_FD; the kernel swaps in the map)."""
        if not isinstance(fd, int) or not 0 <= fd < (1 << 31):
            raise AsmError(f"bad map fd {fd!r}")
        return self.emit(Insn(_LD_IMM64, _check_reg(dst), PSEUDO_MAP_FD, 0, fd))

    # --- control flow --------------------------------------------------------------------

    def jmp_imm(self, op: int, dst: int, imm: int, target: str) -> Program:
        """if dst OP imm goto target (64-bit compare)"""
        return self._jump(CLASS_JMP | op | SRC_K, dst, 0, imm, target)

    def jmp_reg(self, op: int, dst: int, src: int, target: str) -> Program:
        return self._jump(CLASS_JMP | op | SRC_X, dst, _check_reg(src), 0, target)

    def jmp32_imm(self, op: int, dst: int, imm: int, target: str) -> Program:
        """if w-dst OP imm goto target (32-bit compare)"""
        return self._jump(CLASS_JMP32 | op | SRC_K, dst, 0, imm, target)

    def jmp32_reg(self, op: int, dst: int, src: int, target: str) -> Program:
        return self._jump(CLASS_JMP32 | op | SRC_X, dst, _check_reg(src), 0, target)

    def ja(self, target: str) -> Program:
        """goto target"""
        return self._jump(CLASS_JMP | JA, 0, 0, 0, target)

    def _jump(self, code: int, dst: int, src: int, imm: int, target: str) -> Program:
        if code & 0xF0 in (CALL, EXIT):
            raise AsmError("call and exit are not conditional jumps")
        if not isinstance(target, str) or not target:
            raise AsmError(f"jump target must be a label name, not {target!r}")
        return self.emit(Insn(code, _check_reg(dst), src, 0, _check_imm32(imm), target))

    def call(self, helper: int) -> Program:
        return self.emit(Insn(CLASS_JMP | CALL, 0, 0, 0, _check_imm32(helper)))

    def exit(self) -> Program:
        return self.emit(Insn(CLASS_JMP | EXIT))

    # --- output --------------------------------------------------------------------------

    def assemble(self) -> bytes:
        """Encode, resolving labels: offset = target slot - (jump slot + 1)."""
        labels = self._place_labels()
        out = bytearray()
        slot = 0
        for item in self._items:
            if isinstance(item, _Label):
                continue
            off = None
            if item.target is not None:
                if item.target not in labels:
                    raise AsmError(f"unknown label {item.target!r}")
                off = labels[item.target] - (slot + 1)
                if not -0x8000 <= off <= 0x7FFF:
                    raise AsmError(f"jump to {item.target!r} is too far ({off} slots)")
            out += item.encode(off)
            slot += item.slots
        return bytes(out)

    def _place_labels(self) -> Dict[str, int]:
        labels: Dict[str, int] = {}
        slot = 0
        for item in self._items:
            if isinstance(item, Insn):
                slot += item.slots
            elif item.name in labels:
                raise AsmError(f"duplicate label {item.name!r}")
            else:
                labels[item.name] = slot
        end = slot
        for name, position in labels.items():
            if position == end:
                raise AsmError(f"label {name!r} is not followed by an instruction")
        return labels


# --------------------------------------------------------------------------------------------
# Decoding and disassembly


def decode(data: bytes) -> List[Insn]:
    """bytes -> instructions (ld_imm64 joined into one Insn); inverse of Insn.encode."""
    if len(data) % 8:
        raise AsmError(f"program length {len(data)} is not a multiple of 8")
    result: List[Insn] = []
    i = 0
    while i < len(data):
        code, regs, off, imm = struct.unpack_from("=BBhi", data, i)
        dst, src = (regs & 0x0F, regs >> 4) if _LITTLE_ENDIAN else (regs >> 4, regs & 0x0F)
        if code == _LD_IMM64:
            if i + 16 > len(data):
                raise AsmError(f"ld_imm64 at slot {i // 8} is missing its second half")
            high = struct.unpack_from("=BBhi", data, i + 8)[3]
            value = (imm & 0xFFFFFFFF) | ((high & 0xFFFFFFFF) << 32)
            result.append(Insn(code, dst, src, off, value))
            i += 16
        else:
            result.append(Insn(code, dst, src, off, imm))
            i += 8
    return result


def encode(insns: Sequence[Insn]) -> bytes:
    """Instructions with raw offsets (as from :func:`decode`) -> bytes."""
    return b"".join(insn.encode() for insn in insns)


def disassemble(data: bytes, numbered: bool = False) -> List[str]:
    """Readable text, one line per instruction (ld_imm64 is one line).

    With ``numbered`` each line starts with its slot index (as bpftool prints) and jumps also
    show the absolute slot they land on, e.g. ``  12: if r0 == 0x0 goto +3 <16>``.
    """
    map_numbers: Dict[int, int] = {}
    lines = []
    slot = 0
    for insn in decode(data):
        text = _format(insn, map_numbers)
        if numbered:
            if insn.is_jump:
                text += f" <{slot + 1 + insn.off}>"
            text = f"{slot:4d}: {text}"
        lines.append(text)
        slot += insn.slots
    return lines


def _reg(insn_class: int, reg: int) -> str:
    return ("w" if insn_class in (CLASS_ALU, CLASS_JMP32) else "r") + str(reg)


def _mem(size: int, reg: int, off: int) -> str:
    return f"*({_SIZE_NAMES[size]} *)(r{reg} {off:+d})"


def _format(insn: Insn, map_numbers: Dict[int, int]) -> str:
    cls = insn.code & 0x07
    if cls in (CLASS_ALU, CLASS_ALU64):
        text = _format_alu(insn, cls)
    elif cls in (CLASS_JMP, CLASS_JMP32):
        text = _format_jmp(insn, cls)
    elif cls == CLASS_LDX and insn.code & 0xE0 == MODE_MEM:
        text = f"r{insn.dst} = {_mem(insn.code & 0x18, insn.src, insn.off)}"
    elif cls == CLASS_ST and insn.code & 0xE0 == MODE_MEM:
        text = f"{_mem(insn.code & 0x18, insn.dst, insn.off)} = {insn.imm}"
    elif cls == CLASS_STX:
        text = _format_stx(insn)
    elif insn.is_wide:
        text = _format_ld_imm64(insn, map_numbers)
    else:
        text = ""
    return text or _raw(insn)


def _raw(insn: Insn) -> str:
    return (f"(0x{insn.code:02x}) unknown dst=r{insn.dst} src=r{insn.src} off={insn.off} "
            f"imm={insn.imm}")


def _format_alu(insn: Insn, cls: int) -> str:
    op = insn.code & 0xF0
    dst = _reg(cls, insn.dst)
    if insn.off:  # cpu v4 signed div/mod and movsx: not used here, shown raw
        return ""
    if op == NEG:
        return f"{dst} = -{dst}"
    if op == END:
        kind = "bswap" if cls == CLASS_ALU64 else ("be" if insn.code & SRC_X else "le")
        return f"{dst} = {kind}{insn.imm} {dst}"
    if op not in _ALU_SYMBOLS:
        return ""
    operand = _reg(cls, insn.src) if insn.code & SRC_X else str(insn.imm)
    return f"{dst} {_ALU_SYMBOLS[op]} {operand}"


def _format_jmp(insn: Insn, cls: int) -> str:
    op = insn.code & 0xF0
    if op == EXIT:
        return "exit"
    if op == CALL:
        name = HELPER_NAMES.get(insn.imm, "helper")
        return f"call {name}#{insn.imm}"
    if op == JA:
        return f"goto {insn.off:+d}"
    if op not in _JMP_SYMBOLS:
        return ""
    left = _reg(cls, insn.dst)
    right = _reg(cls, insn.src) if insn.code & SRC_X else f"0x{insn.imm & 0xFFFFFFFF:x}"
    return f"if {left} {_JMP_SYMBOLS[op]} {right} goto {insn.off:+d}"


def _format_stx(insn: Insn) -> str:
    mode = insn.code & 0xE0
    size = insn.code & 0x18
    if mode == MODE_MEM:
        return f"{_mem(size, insn.dst, insn.off)} = r{insn.src}"
    if mode == MODE_ATOMIC and size in (W, DW) and insn.imm in _ATOMIC_SYMBOLS:
        src = ("r" if size == DW else "w") + str(insn.src)
        return f"lock {_mem(size, insn.dst, insn.off)} {_ATOMIC_SYMBOLS[insn.imm]} {src}"
    return ""


def _format_ld_imm64(insn: Insn, map_numbers: Dict[int, int]) -> str:
    if insn.src == PSEUDO_MAP_FD:
        number = map_numbers.setdefault(insn.imm, len(map_numbers))
        return f"r{insn.dst} = map[{number}]"
    if insn.src == 0:
        return f"r{insn.dst} = 0x{insn.imm:x} ll"
    return f"r{insn.dst} = pseudo(src={insn.src}) 0x{insn.imm:x} ll"
