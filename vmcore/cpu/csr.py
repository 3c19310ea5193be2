"""Control and status registers: numbers, field masks, and the read/write rules.

Every CSR the hart implements is listed in :data:`CSR_NAMES`; any other number traps as an
illegal instruction, which is what OpenSBI and Linux rely on when they probe for optional
features (Sstc's ``stimecmp``, hpm counters, debug triggers). Fields the hart does not
implement read as zero and ignore writes (WARL).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmcore.cpu.trap import ILLEGAL, Trap

if TYPE_CHECKING:
    from vmcore.cpu.hart import Hart

M64 = (1 << 64) - 1

# mstatus fields
SIE, MIE, SPIE, MPIE, SPP = 1 << 1, 1 << 3, 1 << 5, 1 << 7, 1 << 8
MPP_SHIFT = 11
MPP = 3 << MPP_SHIFT
MPRV, SUM, MXR, TVM, TW, TSR = 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22
UXL_SXL = (2 << 32) | (2 << 34)  # both 64-bit, read-only
MSTATUS_WRITABLE = SIE | MIE | SPIE | MPIE | SPP | MPP | MPRV | SUM | MXR | TVM | TW | TSR
SSTATUS_VISIBLE = SIE | SPIE | SPP | SUM | MXR | (3 << 32) | (1 << 63) | (3 << 13) | (3 << 9)
SSTATUS_WRITABLE = SIE | SPIE | SPP | SUM | MXR
# Changing any of these changes how data addresses translate.
MSTATUS_MMU_BITS = MPRV | SUM | MXR | MPP

# interrupt bits (mip/mie)
SSIP, MSIP, STIP, MTIP, SEIP, MEIP = 1 << 1, 1 << 3, 1 << 5, 1 << 7, 1 << 9, 1 << 11
S_INTS = SSIP | STIP | SEIP
ALL_INTS = S_INTS | MSIP | MTIP | MEIP
MIP_WRITABLE = SSIP | STIP | SEIP

MEDELEG_WRITABLE = 0xB3FF  # every exception but ecall-from-M (bit 11) and reserved 10/14

MISA = (2 << 62) | (1 << 0) | (1 << 2) | (1 << 8) | (1 << 12) | (1 << 18) | (1 << 20)

CSR_NAMES: dict[int, str] = {
    0x001: "fflags", 0x002: "frm", 0x003: "fcsr",
    0x100: "sstatus", 0x104: "sie", 0x105: "stvec", 0x106: "scounteren", 0x10A: "senvcfg",
    0x140: "sscratch", 0x141: "sepc", 0x142: "scause", 0x143: "stval", 0x144: "sip",
    0x180: "satp",
    0x300: "mstatus", 0x301: "misa", 0x302: "medeleg", 0x303: "mideleg", 0x304: "mie",
    0x305: "mtvec", 0x306: "mcounteren", 0x30A: "menvcfg", 0x320: "mcountinhibit",
    0x340: "mscratch", 0x341: "mepc", 0x342: "mcause", 0x343: "mtval", 0x344: "mip",
    0xB00: "mcycle", 0xB02: "minstret",
    0xC00: "cycle", 0xC01: "time", 0xC02: "instret",
    0xF11: "mvendorid", 0xF12: "marchid", 0xF13: "mimpid", 0xF14: "mhartid",
    0xF15: "mconfigptr",
}
for _i in range(0, 16, 2):
    CSR_NAMES[0x3A0 + _i] = f"pmpcfg{_i}"
for _i in range(64):
    CSR_NAMES[0x3B0 + _i] = f"pmpaddr{_i}"
# The F extension is absent: its CSRs trap like its instructions.
for _n in (0x001, 0x002, 0x003):
    del CSR_NAMES[_n]

# Plain storage registers: name -> writable mask.
PLAIN: dict[str, int] = {
    "mscratch": M64, "sscratch": M64, "mtval": M64, "stval": M64, "mcause": M64,
    "scause": M64, "mcountinhibit": 0b101, "mcounteren": 0b111, "scounteren": 0b111,
    "menvcfg": 1, "senvcfg": 1,
}


def _illegal(bits: int, pc: int) -> Trap:
    return Trap(ILLEGAL, bits, pc)


def _counter_allowed(h: Hart, bit: int) -> bool:
    if h.priv == 3:
        return True
    if not h.mcounteren & bit:
        return False
    return h.priv == 1 or bool(h.scounteren & bit)


def read(h: Hart, n: int, bits: int, pc: int, idx: int) -> int:
    """Value of CSR ``n`` as the instruction at ``pc`` (``idx``-th of its block) sees it."""
    name = CSR_NAMES.get(n)
    if name is None or h.priv < (n >> 8) & 3:
        raise _illegal(bits, pc)
    if name in PLAIN:
        return int(getattr(h, name))
    if name == "mstatus":
        return h.mstatus
    if name == "sstatus":
        return h.mstatus & SSTATUS_VISIBLE
    if name == "misa":
        return MISA
    if name == "medeleg":
        return h.medeleg
    if name == "mideleg":
        return h.mideleg
    if name == "mie":
        return h.mie
    if name == "sie":
        return h.mie & h.mideleg
    if name == "mip":
        return h.mip
    if name == "sip":
        return h.mip & h.mideleg
    if name == "mtvec":
        return h.mtvec
    if name == "stvec":
        return h.stvec
    if name == "mepc":
        return h.mepc
    if name == "sepc":
        return h.sepc
    if name == "satp":
        if h.priv == 1 and h.mstatus & TVM:
            raise _illegal(bits, pc)
        return h.satp
    if name.startswith("pmpcfg"):
        return h.pmpcfg[(n - 0x3A0) >> 1]
    if name.startswith("pmpaddr"):
        return h.pmpaddr[n - 0x3B0]
    if name == "mcycle":
        return (h.instret + idx + h.mcycle_off) & M64
    if name == "minstret":
        return (h.instret + idx + h.minstret_off) & M64
    if name == "cycle":
        if not _counter_allowed(h, 1):
            raise _illegal(bits, pc)
        return (h.instret + idx + h.mcycle_off) & M64
    if name == "time":
        if not _counter_allowed(h, 2):
            raise _illegal(bits, pc)
        return h.time_source() & M64
    if name == "instret":
        if not _counter_allowed(h, 4):
            raise _illegal(bits, pc)
        return (h.instret + idx + h.minstret_off) & M64
    if name == "mhartid":
        return h.hartid
    # mvendorid, marchid, mimpid, mconfigptr
    return 0


def write(h: Hart, n: int, v: int, bits: int, pc: int, idx: int) -> None:
    """Write ``v`` to CSR ``n``; the caller has already checked it exists and priv allows."""
    name = CSR_NAMES[n]
    if name in PLAIN:
        setattr(h, name, v & PLAIN[name])
        return
    if name == "mstatus":
        h.set_mstatus((h.mstatus & ~MSTATUS_WRITABLE) | (v & MSTATUS_WRITABLE))
    elif name == "sstatus":
        h.set_mstatus((h.mstatus & ~SSTATUS_WRITABLE) | (v & SSTATUS_WRITABLE))
    elif name == "misa":
        pass
    elif name == "medeleg":
        h.medeleg = v & MEDELEG_WRITABLE
    elif name == "mideleg":
        h.mideleg = v & S_INTS
    elif name == "mie":
        h.mie = v & ALL_INTS
    elif name == "sie":
        h.mie = (h.mie & ~h.mideleg) | (v & h.mideleg)
    elif name == "mip":
        h.write_mip_software(v, MIP_WRITABLE)
    elif name == "sip":
        h.write_mip_software(v, SSIP & h.mideleg)
    elif name in ("mtvec", "stvec"):
        # Modes 2 and 3 are reserved: keep the old mode.
        old = getattr(h, name)
        mode = v & 3 if v & 3 < 2 else old & 3
        setattr(h, name, (v & ~3 & M64) | mode)
    elif name == "mepc":
        h.mepc = v & ~1 & M64
    elif name == "sepc":
        h.sepc = v & ~1 & M64
    elif name == "satp":
        if h.priv == 1 and h.mstatus & TVM:
            raise _illegal(bits, pc)
        mode = v >> 60
        if mode not in (0, 8):
            return  # Sv48/Sv57 and reserved modes: the write is ignored entirely.
        h.set_satp(v & ((0xF << 60) | ((1 << 44) - 1)))  # no ASID bits implemented
    elif name.startswith("pmpcfg"):
        i = (n - 0x3A0) >> 1
        # A locked entry ignores writes; keep each byte's L bit sticky.
        old = h.pmpcfg[i]
        new = 0
        for k in range(8):
            ob = (old >> (8 * k)) & 0xFF
            nb = (v >> (8 * k)) & 0x9F
            new |= (ob if ob & 0x80 else nb) << (8 * k)
        h.pmpcfg[i] = new
    elif name.startswith("pmpaddr"):
        i = n - 0x3B0
        cfg = (h.pmpcfg[i >> 3] >> (8 * (i & 7))) & 0xFF
        if not cfg & 0x80:
            h.pmpaddr[i] = v & ((1 << 54) - 1)
    elif name == "mcycle":
        h.mcycle_off = (v - h.instret - idx - 1) & M64
    elif name == "minstret":
        h.minstret_off = (v - h.instret - idx - 1) & M64


def csr_op(h: Hart, f3: int, n: int, src: int, rd: int, bits: int, pc: int, idx: int) -> None:
    """Execute a Zicsr instruction (csrrw/s/c and their immediate forms)."""
    name = CSR_NAMES.get(n)
    if name is None or h.priv < (n >> 8) & 3:
        raise _illegal(bits, pc)
    kind = f3 & 3
    operand = src if f3 & 4 else h.x[src]
    # csrrw with rd=x0 does not read; csrrs/csrrc with a zero rs1/uimm do not write.
    writes = kind == 1 or src != 0
    if writes and n >> 10 == 3:
        raise _illegal(bits, pc)
    old = read(h, n, bits, pc, idx) if (kind != 1 or rd) else 0
    if writes:
        base = old
        if n in (0x344, 0x144):
            # Read-modify-write of mip uses the software-writable SEIP bit, not the value
            # ORed with the external interrupt line (privileged spec, mip.SEIP).
            base = (old & ~SEIP) | h.seip_sw
        if kind == 1:
            new = operand
        elif kind == 2:
            new = base | operand
        else:
            new = base & ~operand
        write(h, n, new & M64, bits, pc, idx)
    if rd:
        h.x[rd] = old
