"""Read a kernel's SASS (cuobjdump's listing): its instructions, its loops, its main loop.

* :func:`parse`: the instructions (address, predicate, opcode with modifiers, operands).
* :func:`loops`: every loop, from its backward branch (``BRA`` to a lower address).
* :func:`main_loop`: the innermost loop holding the tensor-core instructions (a matrix
  kernel's K loop), else the innermost loop holding the most global loads.
* :func:`summarize`: what the report shows: instruction classes in the loop and overall,
  the tensor-core instruction (HGMMA = wgmma, HMMA = mma.sync), where wgmma reads its A
  operand from (shared memory or registers), the load kinds of the loop (TMA = UTMALDG,
  cp.async = LDGSTS, plain = LDG, joined by '+') and the load widths, local-memory traffic
  (spills).

The counts are static: each instruction in the loop's address range counts once, taken
branches or not (a loop's rarely-taken paths are counted too).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_BRA_TARGET = re.compile(r"0x([0-9a-f]+)")

# Opcode (the part before the first '.') -> class.
MMA = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "DMMA")
CLASSES = {
    "mma": MMA,
    "tma": ("UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF", "UTMACCTL"),
    "cp.async": ("LDGSTS",),
    "global load": ("LDG",),
    "global store": ("STG", "RED", "ATOM", "ATOMG"),
    "shared": ("LDS", "STS", "LDSM", "STSM", "LDGDEPBAR", "DEPBAR", "ATOMS", "SYNCS"),
    "local (spill)": ("LDL", "STL"),
    "barrier": ("BAR", "WARPGROUP", "MEMBAR", "FENCE", "WARPSYNC", "BSYNC", "BSSY", "ERRBAR", "CCTL"),
    "fp": ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FCHK", "MUFU", "HFMA2", "HADD2", "HMUL2", "HMNMX2",
           "HSETP2", "DFMA", "DADD", "DMUL", "FSWZADD"),
    "convert": ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND", "I2I"),
    "branch": ("BRA", "BRX", "EXIT", "RET", "CALL", "JMP", "BPT", "YIELD", "NANOSLEEP"),
}
_CLASS_OF = {op: cls for cls, ops in CLASSES.items() for op in ops}


def op_class(opcode: str) -> str:
    """Class of an opcode: 'mma', 'tma', 'cp.async', ..., 'integer/other' (IMAD, IADD3, LOP3,
    ISETP, SHF, LEA, SEL, MOV, S2R, ULDC, ...: index, address and predicate arithmetic)."""
    return _CLASS_OF.get(opcode.split(".")[0], "integer/other")


@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str
    opcode: str  # with modifiers, e.g. 'LDGSTS.E.BYPASS.128'
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse(text: str) -> list[Instr]:
    """Instructions of the first kernel in a cuobjdump -sass listing, in address order."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return out


@dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and self != other

    def body(self, instrs: list[Instr]) -> list[Instr]:
        return [i for i in instrs if self.start <= i.addr <= self.end and i.base != "NOP"]


def loops(instrs: list[Instr]) -> list[Loop]:
    """One loop per backward branch (a BRA whose target lies at or before it), except the
    trailing self-branch that pads every kernel's end."""
    found = []
    for i in instrs:
        if i.base != "BRA":
            continue
        m = _BRA_TARGET.search(i.operands)
        if m and int(m.group(1), 16) < i.addr:
            found.append(Loop(int(m.group(1), 16), i.addr))
    return sorted(set(found), key=lambda lp: (lp.start, lp.end))


def main_loop(instrs: list[Instr]):
    """The loop the kernel spends its time in, or None when it has no loop.

    A matrix kernel's K loop: the innermost loop with tensor-core instructions. Otherwise
    the innermost loop with the most global loads (a reduction's walk over its partials)."""
    lps = loops(instrs)
    if not lps:
        return None

    def innermost(cands):
        return [lp for lp in cands if not any(lp.contains(o) for o in cands)]

    with_mma = [lp for lp in lps if any(op_class(i.opcode) == "mma" for i in lp.body(instrs))]
    if with_mma:
        return min(innermost(with_mma), key=lambda lp: lp.end - lp.start)

    def n_loads(lp):
        return sum(op_class(i.opcode) in ("global load", "cp.async", "tma") for i in lp.body(instrs))

    return max(innermost(lps), key=lambda lp: (n_loads(lp), lp.end - lp.start))


def _width(opcode: str) -> int:
    """Bytes per thread of a global load opcode (LDG.E.128 -> 16; LDG.E.U16 -> 2; LDG.E -> 4)."""
    for part, w in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if part in opcode:
            return w
    return 4


def summarize(text: str) -> dict:
    """The facts the inspect report shows for one kernel's SASS (see the module docstring)."""
    instrs = parse(text)
    lp = main_loop(instrs)
    body = lp.body(instrs) if lp else []
    mma_ops = [i for i in instrs if op_class(i.opcode) == "mma"]
    mma = mma_ops[0].base if mma_ops else "none"
    a_from = None
    if mma == "HGMMA":
        # 'HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24' reads A from shared memory (a
        # descriptor); 'HGMMA... R24, R120, gdesc[UR4], R24' from registers.
        second = [i.operands.split(",")[1].strip() for i in mma_ops]
        a_from = "registers" if any(s.startswith("R") for s in second) else "shared"
    loads = [i for i in body if op_class(i.opcode) in ("tma", "cp.async", "global load")]
    kinds = {op_class(i.opcode) for i in loads}
    names = [n for k, n in (("tma", "TMA"), ("cp.async", "cp.async"), ("global load", "plain")) if k in kinds]
    load_kind = "+".join(names) or "none"
    widths = sorted({_width(i.opcode) for i in loads if op_class(i.opcode) != "tma"})

    def classes(seq):
        out: dict = {}
        for i in seq:
            c = op_class(i.opcode)
            out[c] = out.get(c, 0) + 1
        return out

    return dict(
        instructions=len([i for i in instrs if i.base != "NOP"]),
        loop_instructions=len(body),
        loop_classes=classes(body),
        classes=classes(i for i in instrs if i.base != "NOP"),
        loops=len(loops(instrs)),
        mma=mma,
        mma_shape=mma_ops[0].opcode.split(".")[1] if mma_ops and mma != "none" else None,
        wgmma_a_from=a_from,
        loop_load_kind=load_kind,
        loop_load_widths=widths,
        loop_sync_loads=sum(op_class(i.opcode) == "global load" for i in body),
        local_memory_instructions=sum(op_class(i.opcode) == "local (spill)" for i in instrs),
        uses_tma=any(op_class(i.opcode) == "tma" for i in instrs),
    )
