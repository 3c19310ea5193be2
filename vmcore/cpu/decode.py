"""Decode-once execution: each guest instruction becomes one specialised Python closure.

This is the reference execution engine (DESIGN §3). A block is the run of instructions from
an entry pc up to the first control transfer, sensitive instruction, page end or
``MAX_BLOCK`` instructions (direct jumps within the page are followed, not ended on).
Ordinary instructions are closures that return nothing; the block's last closure (its
*terminator*) returns the next pc. The hart caches blocks by virtual pc and checks the
physical page at every entry, so a remapped page is re-decoded.

The run loop only relies on the :class:`Block` contract: ``run()`` executes the block and
returns the next pc, ``pcs[i]`` is the pc of the i-th instruction (so a trap can say how
many retired), ``n`` is the instruction count, ``ppage`` the physical page it came from.
Hot blocks get a faster ``run`` from :mod:`vmcore.cpu.compile`; another engine can replace
:func:`translate_block` as ``Hart.translator``, keeping this one as the reference.

Register writes to x0 go to a scratch slot ``x[32]`` so closures never test for rd == 0.
Registers hold unsigned 64-bit values; signed views are made on demand with ``^ S``.
Loads and stores consult the hart's software TLBs (dicts from virtual page number to the
offset that turns a virtual address into an offset in the RAM buffer); a miss, a
page-crossing access, MMIO or a write-protected page drops into the hart's slow path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmcore.cpu import rvc
from vmcore.cpu.trap import BREAKPOINT, ILLEGAL, Trap

if TYPE_CHECKING:
    from vmcore.cpu.hart import Hart

M = (1 << 64) - 1
S = 1 << 63
W = 0xFFFFFFFF
MAX_BLOCK = 64

Op = Callable[[], Any]


# What a block remembers about each instruction, so a hot block can be recompiled:
# (expanded instruction word, pc, length), or (LINK, rd, value) for the link-register
# write of a direct jump that the block followed, or (END, next pc, 0) for a block that
# simply falls through to the next pc.
Info = tuple[int, int, int]
LINK = -1
END = -2


class Block:
    """A decoded straight-line run of guest instructions starting at one pc.

    ``run()`` executes the whole block and returns the next pc. At first it is one
    generated function per block *length* (so nothing is compiled at decode time) that
    calls each instruction closure in turn, which saves the per-instruction cost of a
    Python ``for`` loop over ``ops``. When ``promote`` is given, that caller counts its
    executions and, once the block is hot, returns ``promote(block)`` instead, which
    replaces ``run`` with something faster (see :mod:`vmcore.cpu.compile`) and runs it.
    """

    __slots__ = ("infos", "link", "link_gen", "link_pc", "n", "ops", "pcs", "ppage", "run",
                 "term", "term_info")

    def __init__(self, ops: tuple[Op, ...], term: Callable[[], int], pcs: list[int],
                 ppage: int, infos: list[Info], term_info: Info,
                 promote: tuple[int, Callable[[Block], int]] | None = None) -> None:
        self.ops = ops
        self.term = term
        self.pcs = pcs
        self.n = len(pcs)
        self.ppage = ppage
        self.infos = infos
        self.term_info = term_info
        if promote is None:
            self.run: Callable[[], int] = _runner(len(ops), False)(*ops, term)
        else:
            threshold, fn = promote
            self.run = _runner(len(ops), True)(*ops, term, threshold, lambda: fn(self))
        # The run loop's chaining cache: the block that followed this one last time.
        self.link: Block = self
        self.link_pc = -1
        self.link_gen = -1


_RUNNERS: dict[tuple[int, bool], Callable[..., Callable[[], int]]] = {}


def _runner(n: int, counted: bool) -> Callable[..., Callable[[], int]]:
    """A factory binding ``n`` instruction closures and a terminator into one function."""
    mk = _RUNNERS.get((n, counted))
    if mk is None:
        names = [f"o{i}" for i in range(n)]
        body = "".join(f"        {name}()\n" for name in names)
        if counted:
            params = ", ".join([*names, "t", "left", "hot"])
            body = "        nonlocal left\n        left -= 1\n        if not left:\n" \
                   "            return hot()\n" + body
        else:
            params = ", ".join([*names, "t"])
        src = f"def mk({params}):\n    def run():\n{body}        return t()\n    return run\n"
        ns: dict[str, Any] = {}
        exec(compile(src, f"<block runner {n}>", "exec"), ns)
        mk = _RUNNERS[(n, counted)] = ns["mk"]
    return mk


def _sdiv(a: int, b: int) -> int:
    if b == 0:
        return M
    sa = a - ((a & S) << 1)
    sb = b - ((b & S) << 1)
    q = abs(sa) // abs(sb)
    return (-q if (sa < 0) != (sb < 0) else q) & M


def _srem(a: int, b: int) -> int:
    if b == 0:
        return a
    sa = a - ((a & S) << 1)
    sb = b - ((b & S) << 1)
    r = abs(sa) % abs(sb)
    return (-r if sa < 0 else r) & M


def _sx32(v: int) -> int:
    v &= W
    return v | 0xFFFFFFFF00000000 if v & 0x80000000 else v


def _divw(a: int, b: int) -> int:
    a, b = _sx32(a), _sx32(b)
    if b & W == 0:
        return M
    return _sx32(_sdiv(a, b))


def _remw(a: int, b: int) -> int:
    a, b = _sx32(a), _sx32(b)
    if b & W == 0:
        return a
    return _sx32(_srem(a, b))


def _divuw(a: int, b: int) -> int:
    a, b = a & W, b & W
    return M if b == 0 else _sx32(a // b)


def _remuw(a: int, b: int) -> int:
    a, b = a & W, b & W
    return _sx32(a) if b == 0 else _sx32(a % b)


_SX = "x[d] = v | 0xFFFFFFFF00000000 if v & 0x80000000 else v"

# Two-operand ALU bodies: A and B are the operands, the statement must assign x[d].
# The same body serves register-register (B = x[b]) and register-immediate (B = constant).
_ALU: dict[str, str] = {
    "add": "x[d] = (A + B) & M",
    "sub": "x[d] = (A - B) & M",
    "sll": "x[d] = (A << (B & 63)) & M",
    "slt": "x[d] = 1 if (A ^ S) < (B ^ S) else 0",
    "sltu": "x[d] = 1 if A < B else 0",
    "xor": "x[d] = A ^ B",
    "srl": "x[d] = A >> (B & 63)",
    "sra": "v = A; x[d] = ((v - ((v & S) << 1)) >> (B & 63)) & M",
    "or": "x[d] = A | B",
    "and": "x[d] = A & B",
    "mul": "x[d] = (A * B) & M",
    "mulh": "u = A; v = B; "
            "x[d] = (((u - ((u & S) << 1)) * (v - ((v & S) << 1))) >> 64) & M",
    "mulhsu": "u = A; x[d] = (((u - ((u & S) << 1)) * B) >> 64) & M",
    "mulhu": "x[d] = (A * B) >> 64",
    "div": "x[d] = sdiv(A, B)",
    "divu": "v = B; x[d] = A // v if v else M",
    "rem": "x[d] = srem(A, B)",
    "remu": "u = A; v = B; x[d] = u % v if v else u",
    "addw": "v = (A + B) & W; " + _SX,
    "subw": "v = (A - B) & W; " + _SX,
    "sllw": "v = (A << (B & 31)) & W; " + _SX,
    "srlw": "v = (A & W) >> (B & 31); " + _SX,
    "sraw": "v = A & W; x[d] = (((v ^ 0x80000000) - 0x80000000) >> (B & 31)) & M",
    "mulw": "v = (A * B) & W; " + _SX,
    "divw": "x[d] = divw(A, B)",
    "divuw": "x[d] = divuw(A, B)",
    "remw": "x[d] = remw(A, B)",
    "remuw": "x[d] = remuw(A, B)",
}

_ENV: dict[str, Any] = {
    "M": M, "S": S, "W": W, "sdiv": _sdiv, "srem": _srem, "divw": _divw, "divuw": _divuw,
    "remw": _remw, "remuw": _remuw,
}


def _build_alu() -> tuple[dict[str, Callable[..., Op]], dict[str, Callable[..., Op]]]:
    rr: dict[str, Callable[..., Op]] = {}
    ri: dict[str, Callable[..., Op]] = {}
    for name, body in _ALU.items():
        src_rr = (f"def mk(x, d, a, b):\n    def op():\n        "
                  f"{body.replace('A', 'x[a]').replace('B', 'x[b]')}\n    return op\n")
        src_ri = (f"def mk(x, d, a, b):\n    def op():\n        "
                  f"{body.replace('A', 'x[a]').replace('B', 'b')}\n    return op\n")
        for src, table in ((src_rr, rr), (src_ri, ri)):
            ns: dict[str, Any] = dict(_ENV)
            exec(compile(src, f"<alu {name}>", "exec"), ns)
            table[name] = ns["mk"]
    return rr, ri


_RR, _RI = _build_alu()

_U8 = struct.Struct("<B")
_I8 = struct.Struct("<b")
_U16 = struct.Struct("<H")
_I16 = struct.Struct("<h")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")

# (struct, size, signed) per load funct3
_LOADS: dict[int, tuple[struct.Struct, int, bool]] = {
    0: (_I8, 1, True), 1: (_I16, 2, True), 2: (_I32, 4, True), 3: (_U64, 8, False),
    4: (_U8, 1, False), 5: (_U16, 2, False), 6: (_U32, 4, False),
}
_STORES: dict[int, tuple[struct.Struct, int]] = {0: (_U8, 1), 1: (_U16, 2), 2: (_U32, 4),
                                                  3: (_U64, 8)}


def _mk_load(h: Hart, d: int, a: int, imm: int, f3: int, pc: int) -> Op:
    st, size, signed = _LOADS[f3]
    unpack = st.unpack_from
    x = h.x
    rt = h.rtlb
    buf = h.ram.buf
    slow = h.load_slow
    lim = 4096 - size
    if signed:
        def op() -> None:
            v = (x[a] + imm) & M
            p = rt.get(v >> 12)
            if p is not None and (v & 4095) <= lim:
                x[d] = unpack(buf, v + p)[0] & M
            else:
                x[d] = slow(v, size, True, pc)
    elif size == 1:
        def op() -> None:
            v = (x[a] + imm) & M
            p = rt.get(v >> 12)
            if p is not None:
                x[d] = buf[v + p]
            else:
                x[d] = slow(v, 1, False, pc)
    else:
        def op() -> None:
            v = (x[a] + imm) & M
            p = rt.get(v >> 12)
            if p is not None and (v & 4095) <= lim:
                x[d] = unpack(buf, v + p)[0]
            else:
                x[d] = slow(v, size, False, pc)
    return op


def _mk_store(h: Hart, a: int, b: int, imm: int, f3: int, pc: int) -> Op:
    st, size = _STORES[f3]
    pack = st.pack_into
    x = h.x
    wt = h.wtlb
    buf = h.ram.buf
    slow = h.store_slow
    lim = 4096 - size
    mask = (1 << (8 * size)) - 1
    if size == 1:
        def op() -> None:
            v = (x[a] + imm) & M
            p = wt.get(v >> 12)
            if p is not None:
                buf[v + p] = x[b] & 255
            else:
                slow(v, 1, x[b] & 255, pc)
    elif size == 8:
        def op() -> None:
            v = (x[a] + imm) & M
            p = wt.get(v >> 12)
            if p is not None and (v & 4095) <= 4088:
                pack(buf, v + p, x[b])
            else:
                slow(v, 8, x[b], pc)
    else:
        def op() -> None:
            v = (x[a] + imm) & M
            p = wt.get(v >> 12)
            if p is not None and (v & 4095) <= lim:
                pack(buf, v + p, x[b] & mask)
            else:
                slow(v, size, x[b] & mask, pc)
    return op


def _mk_branch(x: list[int], f3: int, a: int, b: int, t: int, f: int) -> Callable[[], int] | None:
    if f3 == 0:
        if b == 0:
            return lambda: t if not x[a] else f
        return lambda: t if x[a] == x[b] else f
    if f3 == 1:
        if b == 0:
            return lambda: t if x[a] else f
        return lambda: t if x[a] != x[b] else f
    if f3 == 4:
        return lambda: t if (x[a] ^ S) < (x[b] ^ S) else f
    if f3 == 5:
        return lambda: t if (x[a] ^ S) >= (x[b] ^ S) else f
    if f3 == 6:
        return lambda: t if x[a] < x[b] else f
    if f3 == 7:
        return lambda: t if x[a] >= x[b] else f
    return None


def _sext(v: int, bits: int) -> int:
    m = 1 << (bits - 1)
    return ((v ^ m) - m) & M


def _nop() -> None:
    pass


_OPIMM_NAMES = {0: "add", 2: "slt", 3: "sltu", 4: "xor", 6: "or", 7: "and"}
_OP_NAMES = {
    (0, 0): "add", (0x20, 0): "sub", (0, 1): "sll", (0, 2): "slt", (0, 3): "sltu",
    (0, 4): "xor", (0, 5): "srl", (0x20, 5): "sra", (0, 6): "or", (0, 7): "and",
    (1, 0): "mul", (1, 1): "mulh", (1, 2): "mulhsu", (1, 3): "mulhu", (1, 4): "div",
    (1, 5): "divu", (1, 6): "rem", (1, 7): "remu",
}
_OP32_NAMES = {
    (0, 0): "addw", (0x20, 0): "subw", (0, 1): "sllw", (0, 5): "srlw", (0x20, 5): "sraw",
    (1, 0): "mulw", (1, 4): "divw", (1, 5): "divuw", (1, 6): "remw", (1, 7): "remuw",
}
_AMO_FUNCS = {0: "add", 1: "swap", 4: "xor", 8: "or", 12: "and", 16: "min", 20: "max",
              24: "minu", 28: "maxu"}


def _illegal(bits: int, pc: int) -> Callable[[], int]:
    def op() -> int:
        raise Trap(ILLEGAL, bits, pc)
    return op


def decode(h: Hart, insn: int, bits: int, pc: int, ilen: int, idx: int) -> tuple[Op, bool]:
    """Turn one (expanded) instruction into a closure; the bool says it ends the block.

    ``bits`` is the instruction as fetched (16 or 32 bits), reported in xtval when it is
    illegal; ``idx`` is its position in the block, which CSR reads of instret need.
    """
    x = h.x
    opc = insn & 0x7F
    rd = (insn >> 7) & 31
    f3 = (insn >> 12) & 7
    a = (insn >> 15) & 31
    b = (insn >> 20) & 31
    f7 = insn >> 25
    d = rd or 32
    nxt = (pc + ilen) & M
    if opc == 0x13:  # OP-IMM
        imm = _sext(insn >> 20, 12)
        if rd == 0:
            return _nop, False
        if f3 == 0:
            if a == 0:
                def li() -> None:
                    x[d] = imm
                return li, False
            if imm == 0:
                def mv() -> None:
                    x[d] = x[a]
                return mv, False
        if f3 == 1:
            if insn >> 26:
                return _illegal(bits, pc), True
            return _RI["sll"](x, d, a, b | (f7 & 1) << 5), False
        if f3 == 5:
            sh = (insn >> 20) & 63
            kind = insn >> 26
            if kind == 0:
                return _RI["srl"](x, d, a, sh), False
            if kind == 0x10:
                return _RI["sra"](x, d, a, sh), False
            return _illegal(bits, pc), True
        return _RI[_OPIMM_NAMES[f3]](x, d, a, imm), False
    if opc == 0x33 or opc == 0x3B:  # OP / OP-32
        name = (_OP_NAMES if opc == 0x33 else _OP32_NAMES).get((f7, f3))
        if name is None:
            return _illegal(bits, pc), True
        if rd == 0:
            return _nop, False
        return _RR[name](x, d, a, b), False
    if opc == 0x03:
        if f3 == 7:
            return _illegal(bits, pc), True
        return _mk_load(h, d, a, _sext(insn >> 20, 12), f3, pc), False
    if opc == 0x23:
        if f3 > 3:
            return _illegal(bits, pc), True
        imm = _sext(((insn >> 25) << 5) | ((insn >> 7) & 31), 12)
        return _mk_store(h, a, b, imm, f3, pc), False
    if opc == 0x63:
        imm = ((insn >> 31) << 12) | (((insn >> 7) & 1) << 11) | (((insn >> 25) & 0x3F) << 5) \
            | (((insn >> 8) & 0xF) << 1)
        t = (pc + _sext(imm, 13)) & M
        br = _mk_branch(x, f3, a, b, t, nxt)
        if br is None:
            return _illegal(bits, pc), True
        return br, True
    if opc == 0x37:  # LUI
        if rd == 0:
            return _nop, False
        v = _sext(insn & 0xFFFFF000, 32)
        def lui() -> None:
            x[d] = v
        return lui, False
    if opc == 0x17:  # AUIPC
        if rd == 0:
            return _nop, False
        v = (pc + _sext(insn & 0xFFFFF000, 32)) & M
        def auipc() -> None:
            x[d] = v
        return auipc, False
    if opc == 0x6F:  # JAL
        t = _jal_target(insn, pc)
        if rd == 0:
            return (lambda: t), True
        def jal() -> int:
            x[d] = nxt
            return t
        return jal, True
    if opc == 0x67:  # JALR
        if f3:
            return _illegal(bits, pc), True
        imm = _sext(insn >> 20, 12)
        def jalr() -> int:
            t = (x[a] + imm) & 0xFFFFFFFFFFFFFFFE
            x[d] = nxt
            return t
        return jalr, True
    if opc == 0x1B:  # OP-IMM-32
        if f3 == 0:
            if rd == 0:
                return _nop, False
            return _RI["addw"](x, d, a, _sext(insn >> 20, 12)), False
        if f3 == 1 and f7 == 0:
            return _RI["sllw"](x, d, a, b), False
        if f3 == 5 and f7 == 0:
            return _RI["srlw"](x, d, a, b), False
        if f3 == 5 and f7 == 0x20:
            return _RI["sraw"](x, d, a, b), False
        return _illegal(bits, pc), True
    if opc == 0x2F:  # AMO
        func = insn >> 27
        if f3 not in (2, 3):
            return _illegal(bits, pc), True
        size = 4 if f3 == 2 else 8
        if func == 2:
            if b:
                return _illegal(bits, pc), True
            lr = h.load_reserved
            def lr_op() -> None:
                x[d] = lr(x[a], size, pc)
            return lr_op, False
        if func == 3:
            sc = h.store_conditional
            def sc_op() -> None:
                x[d] = sc(x[a], size, x[b], pc)
            return sc_op, False
        amo_name = _AMO_FUNCS.get(func)
        if amo_name is None:
            return _illegal(bits, pc), True
        amo = h.amo
        def amo_op() -> None:
            x[d] = amo(amo_name, x[a], size, x[b], pc)
        return amo_op, False
    if opc == 0x0F:  # MISC-MEM
        if f3 == 0:
            return _nop, False
        if f3 == 1:
            fence_i = h.fence_i
            def fi() -> int:
                fence_i()
                return nxt
            return fi, True
        return _illegal(bits, pc), True
    if opc == 0x73:
        return _decode_system(h, insn, bits, pc, nxt, idx)
    return _illegal(bits, pc), True


def _decode_system(h: Hart, insn: int, bits: int, pc: int, nxt: int,
                   idx: int) -> tuple[Op, bool]:
    f3 = (insn >> 12) & 7
    rd = (insn >> 7) & 31
    a = (insn >> 15) & 31
    if f3 == 0:
        if insn == 0x00000073:
            ecall = h.ecall
            return (lambda: ecall(pc)), True
        if insn == 0x00100073:
            def ebreak() -> int:
                raise Trap(BREAKPOINT, 0, pc)
            return ebreak, True
        if insn == 0x30200073:
            mret = h.mret
            return (lambda: mret(bits, pc)), True
        if insn == 0x10200073:
            sret = h.sret
            return (lambda: sret(bits, pc)), True
        if insn == 0x10500073:
            wfi = h.wfi
            return (lambda: wfi(bits, pc, nxt)), True
        if (insn >> 25) == 0x09 and rd == 0:
            sfence = h.sfence_vma
            b = (insn >> 20) & 31
            return (lambda: sfence(bits, pc, nxt, a, b)), True
        return _illegal(bits, pc), True
    if f3 == 4:
        return _illegal(bits, pc), True
    csr = insn >> 20
    csr_op = h.csr_op
    def csr_insn() -> int:
        csr_op(f3, csr, a, rd, bits, pc, idx)
        return nxt
    return csr_insn, True


def _jal_target(insn: int, pc: int) -> int:
    imm = ((insn >> 31) << 20) | (((insn >> 12) & 0xFF) << 12) | (((insn >> 20) & 1) << 11) \
        | (((insn >> 21) & 0x3FF) << 1)
    return (pc + _sext(imm, 21)) & M


def _mk_link(x: list[int], d: int, link: int) -> Op:
    def jal_link() -> None:
        x[d] = link
    return jal_link


def translate_block(h: Hart, pc: int, ppage: int) -> tuple[Block, bool]:
    """Decode the block at ``pc`` (whose page is physical page ``ppage``).

    Returns the block and whether it may be cached: a block whose only instruction straddles
    a page boundary depends on two translations and is decoded afresh each time.
    """
    ops: list[Op] = []
    pcs: list[int] = []
    infos: list[Info] = []
    term: Callable[[], int] | None = None
    term_info: Info = (END, 0, 0)
    cur = pc
    page_end = (pc | 4095) + 1
    cacheable = True
    fetch = h.fetch_parcel
    while len(pcs) < MAX_BLOCK:
        if cur >= page_end:
            break
        try:
            lo = fetch(cur, ppage, cur)
            if lo & 3 == 3:
                if cur + 2 >= page_end:
                    if pcs:
                        break
                    cacheable = False
                    hi = h.fetch_parcel_translated(cur + 2, pc)
                else:
                    hi = fetch(cur + 2, ppage, cur)
                bits = lo | (hi << 16)
                insn = bits
                ilen = 4
            else:
                bits = lo
                insn = rvc.expand(lo)
                ilen = 2
        except Trap:
            if pcs:
                break
            raise
        if insn & 0x7F == 0x6F:
            # A direct jump within the page: keep decoding at its target instead of ending
            # the block (the page check at block entry covers the target too). Not into
            # an address already in this block, so each pc appears once in ``pcs``.
            target = _jal_target(insn, cur)
            if target >> 12 == pc >> 12 and target not in pcs and target != cur:
                rd = (insn >> 7) & 31
                pcs.append(cur)
                if rd:
                    ops.append(_mk_link(h.x, rd, (cur + ilen) & M))
                    infos.append((LINK, rd, (cur + ilen) & M))
                cur = target
                continue
        fn, ends = decode(h, insn, bits, cur, ilen, len(pcs))
        info = (insn, cur, ilen)
        pcs.append(cur)
        cur = (cur + ilen) & M
        if ends:
            term = fn
            term_info = info
            break
        ops.append(fn)
        infos.append(info)
    if term is None:
        end = cur
        term = lambda: end  # noqa: E731
        term_info = (END, end, 0)
    promote = (h.hot_threshold, h.promote_block) if h.hot_threshold > 0 else None
    return Block(tuple(ops), term, pcs, ppage, infos, term_info, promote), cacheable
