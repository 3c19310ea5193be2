"""Hot-block compiler: one generated Python function per hot block, bodies inlined.

The decode-once closures (:mod:`vmcore.cpu.decode`) stay the reference engine. A block
that has run ``Hart.hot_threshold`` times is recompiled here into a single function whose
instructions are inlined statements with their registers and immediates as literals,
which removes the per-instruction call (the main cost in CPython, see MEASUREMENTS.md).
The generated code calls the same slow paths with the same arguments as the closures, so
traps, MMIO, dirty logging and code invalidation behave identically. Instructions without
a template here (CSR access, AMOs, system instructions, ...) call their existing closure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmcore.cpu.decode import (
    _ALU,
    _ENV,
    _I8,
    _I16,
    _I32,
    _OP32_NAMES,
    _OP_NAMES,
    _OPIMM_NAMES,
    _U16,
    _U32,
    _U64,
    END,
    LINK,
    Block,
    Info,
    _jal_target,
    _sext,
)

if TYPE_CHECKING:
    from vmcore.cpu.hart import Hart

_NS: dict[str, Any] = dict(_ENV)
_NS.update({
    "ld1s": _I8.unpack_from, "ld2s": _I16.unpack_from, "ld4s": _I32.unpack_from,
    "ld8": _U64.unpack_from, "ld2u": _U16.unpack_from, "ld4u": _U32.unpack_from,
    "st2": _U16.pack_into, "st4": _U32.pack_into, "st8": _U64.pack_into,
})
_LOAD_FN = {0: ("ld1s", 1, True), 1: ("ld2s", 2, True), 2: ("ld4s", 4, True),
            3: ("ld8", 8, False), 4: ("", 1, False), 5: ("ld2u", 2, False),
            6: ("ld4u", 4, False)}
_STORE_FN = {0: ("", 1), 1: ("st2", 2), 2: ("st4", 4), 3: ("st8", 8)}
_BRANCH = {0: "{A} == {B}", 1: "{A} != {B}", 4: "({A} ^ S) < ({B} ^ S)",
           5: "({A} ^ S) >= ({B} ^ S)", 6: "{A} < {B}", 7: "{A} >= {B}"}


def _alu(name: str, d: int, a: int, b: str) -> list[str]:
    body = _ALU[name].replace("A", f"x[{a}]").replace("B", b).replace("x[d]", f"x[{d}]")
    return body.split("; ")


def _load(insn: int, pc: int) -> list[str]:
    rd = (insn >> 7) & 31
    d = rd or 32
    a = (insn >> 15) & 31
    imm = _sext(insn >> 20, 12)
    fn, size, signed = _LOAD_FN[(insn >> 12) & 7]
    if size == 1 and not signed:
        fast = ["if p is not None:", f"    x[{d}] = buf[v + p]"]
    else:
        fast = [f"if p is not None and (v & 4095) <= {4096 - size}:",
                f"    x[{d}] = {fn}(buf, v + p)[0]{' & M' if signed else ''}"]
    return [f"v = (x[{a}] + {imm}) & M", "p = rt.get(v >> 12)", *fast, "else:",
            f"    x[{d}] = lslow(v, {size}, {signed}, {pc})"]


def _store(insn: int, pc: int) -> list[str]:
    a = (insn >> 15) & 31
    b = (insn >> 20) & 31
    imm = _sext(((insn >> 25) << 5) | ((insn >> 7) & 31), 12)
    fn, size = _STORE_FN[(insn >> 12) & 7]
    val = f"x[{b}]" if size == 8 else f"(x[{b}] & {(1 << (8 * size)) - 1})"
    if size == 1:
        fast = ["if p is not None:", f"    buf[v + p] = {val}"]
    else:
        fast = [f"if p is not None and (v & 4095) <= {4096 - size}:",
                f"    {fn}(buf, v + p, {val})"]
    return [f"v = (x[{a}] + {imm}) & M", "p = wt.get(v >> 12)", *fast, "else:",
            f"    sslow(v, {size}, {val}, {pc})"]


def _statement(info: Info) -> list[str] | None:
    """Source lines for a non-terminating instruction, or None to call its closure."""
    insn, pc, ilen = info
    if insn == LINK:
        return [f"x[{pc}] = {ilen}"]
    opc = insn & 0x7F
    rd = (insn >> 7) & 31
    f3 = (insn >> 12) & 7
    a = (insn >> 15) & 31
    b = (insn >> 20) & 31
    f7 = insn >> 25
    if opc == 0x13:
        if rd == 0:
            return []
        imm = _sext(insn >> 20, 12)
        if f3 == 0:
            if a == 0:
                return [f"x[{rd}] = {imm}"]
            if imm == 0:
                return [f"x[{rd}] = x[{a}]"]
            return _alu("add", rd, a, str(imm))
        if f3 == 1:
            return _alu("sll", rd, a, str((insn >> 20) & 63))
        if f3 == 5:
            return _alu("sra" if insn >> 30 & 1 else "srl", rd, a, str((insn >> 20) & 63))
        return _alu(_OPIMM_NAMES[f3], rd, a, str(imm))
    if opc == 0x33 or opc == 0x3B:
        name = (_OP_NAMES if opc == 0x33 else _OP32_NAMES).get((f7, f3))
        if name is None:
            return None
        return [] if rd == 0 else _alu(name, rd, a, f"x[{b}]")
    if opc == 0x1B:
        if rd == 0 and f3 == 0:
            return []
        if f3 == 0:
            return _alu("addw", rd or 32, a, str(_sext(insn >> 20, 12)))
        names = {(1, 0): "sllw", (5, 0): "srlw", (5, 0x20): "sraw"}
        name = names.get((f3, f7))
        return None if name is None else _alu(name, rd or 32, a, str(b))
    if opc == 0x37:
        return [] if rd == 0 else [f"x[{rd}] = {_sext(insn & 0xFFFFF000, 32)}"]
    if opc == 0x17:
        return [] if rd == 0 else [f"x[{rd}] = {(pc + _sext(insn & 0xFFFFF000, 32)) & _ENV['M']}"]
    if opc == 0x03 and f3 != 7:
        return _load(insn, pc)
    if opc == 0x23 and f3 <= 3:
        return _store(insn, pc)
    return None


def _terminator(info: Info) -> list[str] | None:
    """Source lines that end the block by returning the next pc, or None for its closure."""
    insn, pc, ilen = info
    if insn == END:
        return [f"return {pc}"]
    m = _ENV["M"]
    opc = insn & 0x7F
    rd = (insn >> 7) & 31
    f3 = (insn >> 12) & 7
    a = (insn >> 15) & 31
    b = (insn >> 20) & 31
    nxt = (pc + ilen) & m
    if opc == 0x63 and f3 in _BRANCH:
        imm = ((insn >> 31) << 12) | (((insn >> 7) & 1) << 11) | (((insn >> 25) & 0x3F) << 5) \
            | (((insn >> 8) & 0xF) << 1)
        t = (pc + _sext(imm, 13)) & m
        cond = _BRANCH[f3].format(A=f"x[{a}]", B=f"x[{b}]")
        return [f"return {t} if {cond} else {nxt}"]
    if opc == 0x6F:
        t = _jal_target(insn, pc)
        return ([f"x[{rd}] = {nxt}"] if rd else []) + [f"return {t}"]
    if opc == 0x67 and f3 == 0:
        imm = _sext(insn >> 20, 12)
        return [f"t = (x[{a}] + {imm}) & 0xFFFFFFFFFFFFFFFE", f"x[{rd or 32}] = {nxt}",
                "return t"]
    return None


def compile_block(h: Hart, blk: Block) -> Callable[[], int]:
    """A function equivalent to ``blk.run`` with the instruction bodies inlined."""
    lines: list[str] = []
    fallbacks: dict[str, Callable[[], Any]] = {}
    for i, (info, op) in enumerate(zip(blk.infos, blk.ops, strict=True)):
        stmt = _statement(info)
        if stmt is None:
            name = f"c{i}"
            fallbacks[name] = op
            stmt = [f"{name}()"]
        lines.extend(stmt)
    term = _terminator(blk.term_info)
    if term is None:
        fallbacks["ct"] = blk.term
        term = ["return ct()"]
    lines.extend(term)
    params = ", ".join(["x", "rt", "wt", "buf", "lslow", "sslow", *fallbacks])
    body = "".join(f"        {line}\n" for line in lines)
    src = f"def mk({params}):\n    def run():\n{body}    return run\n"
    ns = dict(_NS)
    exec(compile(src, f"<block {blk.pcs[0]:#x}>", "exec"), ns)
    fn: Callable[[], int] = ns["mk"](h.x, h.rtlb, h.wtlb, h.ram.buf, h.load_slow, h.store_slow,
                                     *fallbacks.values())
    return fn
