"""One RISC-V RV64IMAC hart with M, S and U modes and Sv39: the virtual CPU.

The hart owns its architectural state (registers, CSRs, privilege, LR reservation) and the
monitor side of execution: the run loop, the slow paths that ordinary instructions fall
into (TLB misses, MMIO, write-protected pages), and the emulation of sensitive
instructions (CSR access, xRET, WFI, SFENCE.VMA, FENCE.I, ECALL). The fast path - decoded
instruction closures - lives in :mod:`vmcore.cpu.decode`.

Software TLBs. Three dicts map a virtual page number to what the fast path needs:

* ``itlb``: vpn -> physical page number, for instruction fetch;
* ``rtlb``/``wtlb``: vpn -> (RAM-buffer offset of the page) - (virtual page address), so a
  closure computes its buffer offset with one addition.

Only RAM pages enter ``rtlb``/``wtlb``; MMIO always takes the slow path. A page enters
``wtlb`` only after a store to it went through the slow path, which is where the dirty log
marks it and where stores into decoded code invalidate that code; dropping ``wtlb``
therefore write-protects every page at once. All three are cleared (never rebound: the
closures hold them) whenever translation or permissions may have changed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from vmcore.bus import Bus, BusError
from vmcore.cpu import csr as csrmod
from vmcore.cpu import mmu
from vmcore.cpu.compile import compile_block
from vmcore.cpu.csr import (
    MEIP,
    MIE,
    MPIE,
    MPP,
    MPP_SHIFT,
    MPRV,
    MSIP,
    MSTATUS_MMU_BITS,
    MTIP,
    SEIP,
    SIE,
    SPIE,
    SPP,
    SSIP,
    STIP,
    TSR,
    TVM,
    TW,
    UXL_SXL,
)
from vmcore.cpu.decode import Block, translate_block
from vmcore.cpu.trap import (
    CAUSE_NAMES,
    ILLEGAL,
    INSN_ACCESS,
    INTERRUPT,
    LOAD_ACCESS,
    LOAD_MISALIGNED,
    STORE_ACCESS,
    STORE_MISALIGNED,
    Trap,
)
from vmcore.memory import GuestRAM

M64 = (1 << 64) - 1
STATE_VERSION = 1
MAX_CACHED_BLOCKS = 1 << 16
# Highest priority first (privileged spec 3.1.9).
_INT_PRIORITY = (11, 3, 7, 9, 1, 5)
_PRIV_NAMES = {0: "U", 1: "S", 3: "M"}

_U16 = struct.Struct("<H")
_STRUCTS = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
            8: struct.Struct("<Q")}

_SAVED_CSRS = (
    "mstatus", "medeleg", "mideleg", "mie", "mtvec", "stvec", "mepc", "sepc", "mcause",
    "scause", "mtval", "stval", "mscratch", "sscratch", "mcounteren", "scounteren",
    "menvcfg", "senvcfg", "mcountinhibit", "satp", "mcycle_off", "minstret_off", "seip_sw",
    "seip_ext", "mip_base",
)

Translator = Callable[["Hart", int, int], tuple[Block, bool]]


class Hart:
    """A RISC-V hart. See the module docstring for how the fast and slow paths meet.

    ``x`` has 33 entries: ``x[0..31]`` are the registers (``x[0]`` always 0) and ``x[32]``
    is where instructions whose destination is x0 write, so decoded closures never test
    for it. ``pc`` is current between :meth:`run` calls (inside a run the loop keeps it in
    a local). Swap ``translator`` to change execution engines; see ``decode.Block``.
    """

    def __init__(self, ram: GuestRAM, bus: Bus, *, hartid: int = 0,
                 time_source: Callable[[], int]) -> None:
        self.ram = ram
        self.bus = bus
        self.hartid = hartid
        self.time_source = time_source
        self.trace: Callable[[str], None] | None = None
        # x[32] is a write-only scratch slot standing in for x0 as a destination.
        self.x: list[int] = [0] * 33
        self.pc = 0
        self.priv = 3
        self.instret = 0
        self.waiting = False
        self.itlb: dict[int, int] = {}
        self.rtlb: dict[int, int] = {}
        self.wtlb: dict[int, int] = {}
        self.blocks: dict[int, Block] = {}
        self.page_blocks: dict[int, list[int]] = {}
        self.code_pages = bytearray(ram.page_count)
        self.translator: Translator = translate_block
        # Blocks run this many times are recompiled into one Python function each
        # (vmcore.cpu.compile); 0 keeps every block on the reference closures.
        self.hot_threshold = 64
        self._exit = False
        # Set whenever the run loop must leave straight-line execution to look around:
        # interrupt lines, CSR writes, mode changes, invalidations, exit requests.
        self._attention = True
        # Bumped whenever TLB entries or decoded blocks are dropped; block chaining
        # links made under an older generation are not followed.
        self._gen = 0
        self._ram_base_page = ram.base >> 12
        ram.dirty_log.protect_listeners.append(self.wtlb.clear)
        ram.write_listeners.append(self._ram_written)
        self.reset(0x1000)

    # ----------------------------------------------------------------- state

    def reset(self, pc: int) -> None:
        """Power-on state: M-mode at ``pc``, CSRs at their reset values, caches empty."""
        self.x[:] = [0] * 33
        self.pc = pc
        self.priv = 3
        self.waiting = False
        self.mstatus = UXL_SXL
        self.medeleg = 0
        self.mideleg = 0
        self.mie = 0
        self.mip_base = 0  # mip without SEIP, which has two sources:
        self.seip_sw = 0  # the bit M-mode software writes
        self.seip_ext = 0  # the external interrupt line (from the PLIC)
        self.mip = 0
        self.mtvec = 0
        self.stvec = 0
        self.mepc = 0
        self.sepc = 0
        self.mcause = 0
        self.scause = 0
        self.mtval = 0
        self.stval = 0
        self.mscratch = 0
        self.sscratch = 0
        self.mcounteren = 0
        self.scounteren = 0
        self.menvcfg = 0
        self.senvcfg = 0
        self.mcountinhibit = 0
        self.satp = 0
        self.pmpcfg: list[int] = [0] * 8
        self.pmpaddr: list[int] = [0] * 64
        self.mcycle_off = 0
        self.minstret_off = 0
        self.resv = -1
        self.flush_translations()

    def save(self) -> dict[str, Any]:
        """Architectural state as a msgpack-serialisable dict (decode caches are not state)."""
        d: dict[str, Any] = {
            "version": STATE_VERSION,
            "pc": self.pc,
            "x": self.x[:32],
            "priv": self.priv,
            "instret": self.instret,
            "waiting": self.waiting,
            "resv": self.resv,
            "pmpcfg": list(self.pmpcfg),
            "pmpaddr": list(self.pmpaddr),
            "hartid": self.hartid,
        }
        d["csrs"] = {name: getattr(self, name) for name in _SAVED_CSRS}
        return d

    def restore(self, d: dict[str, Any]) -> None:
        """Load state written by :meth:`save`; rejects other versions with ValueError."""
        version = d.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"hart state version {version!r} is not supported (expected {STATE_VERSION})"
            )
        try:
            x = [int(v) & M64 for v in d["x"]]
            if len(x) != 32:
                raise ValueError("hart state has a register file of the wrong size")
            csrs = d["csrs"]
            self.x[:] = [*x, 0]
            self.x[0] = 0
            self.pc = int(d["pc"])
            self.priv = int(d["priv"])
            self.instret = int(d["instret"])
            self.waiting = bool(d["waiting"])
            self.resv = int(d["resv"])
            self.pmpcfg = [int(v) for v in d["pmpcfg"]]
            self.pmpaddr = [int(v) for v in d["pmpaddr"]]
            for name in _SAVED_CSRS:
                setattr(self, name, int(csrs[name]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"hart state is incomplete or malformed: {e}") from None
        if self.priv not in (0, 1, 3):
            raise ValueError(f"hart state has an invalid privilege level {self.priv}")
        self._update_mip()
        self.flush_translations()

    # ------------------------------------------------------------- interrupts

    def set_pending(self, mask: int, level: bool) -> None:
        """Drive interrupt lines into mip (MEIP, SEIP, MTIP, MSIP; STIP/SSIP too)."""
        if mask & SEIP:
            self.seip_ext = SEIP if level else 0
            mask &= ~SEIP
        if level:
            self.mip_base |= mask
        else:
            self.mip_base &= ~mask
        self._update_mip()

    def write_mip_software(self, v: int, mask: int) -> None:
        """A CSR write of mip/sip: only the bits in ``mask`` change."""
        if mask & SEIP:
            self.seip_sw = v & SEIP
        m = mask & ~SEIP
        self.mip_base = (self.mip_base & ~m) | (v & m)
        self._update_mip()

    def _update_mip(self) -> None:
        self.mip = self.mip_base | self.seip_sw | self.seip_ext
        self._attention = True
        if self.waiting and self.mip & self.mie:
            self.waiting = False

    def _check_interrupts(self) -> bool:
        """Take the highest-priority pending and enabled interrupt, if any."""
        pend = self.mip & self.mie
        m = pend & ~self.mideleg
        if m and (self.priv < 3 or self.mstatus & MIE):
            pend = m
        else:
            s = pend & self.mideleg
            if s and (self.priv == 0 or (self.priv == 1 and self.mstatus & SIE)):
                pend = s
            else:
                return False
        for code in _INT_PRIORITY:
            if pend >> code & 1:
                self._take_trap(INTERRUPT | code, 0, self.pc)
                return True
        return False

    def request_exit(self) -> None:
        """Make :meth:`run` return at the end of the current block."""
        self._exit = True
        self._attention = True

    # -------------------------------------------------------------------- run

    def run(self, budget: int) -> int:
        """Execute about ``budget`` instructions; return how many retired."""
        if self.waiting:
            if not self.mip & self.mie:
                return 0
            self.waiting = False
        itlb = self.itlb
        blocks = self.blocks
        ins = start = self.instret
        limit = ins + budget
        pc = self.pc
        gen = -1
        blk: Block | None = None
        self._attention = True
        while True:
            cur: Block | None = None
            try:
                while True:
                    if self._attention:
                        # Rare path: something outside straight-line execution happened
                        # (interrupt line, CSR write, mode change, invalidation, exit).
                        self._attention = False
                        if self._exit:
                            break
                        gen = self._gen
                        blk = None
                        if self.mip & self.mie:
                            self.pc = pc
                            self._check_interrupts()
                            pc = self.pc
                    # Chained successor: valid while no translation or code was dropped.
                    if blk is not None and blk.link_pc == pc and blk.link_gen == gen:
                        cur = blk.link
                    else:
                        ppage = itlb.get(pc >> 12)
                        if ppage is None:
                            ppage = self._fill_itlb(pc)
                        cur = blocks.get(pc)
                        if cur is None or cur.ppage != ppage:
                            cur = self._translate(pc, ppage)
                        if blk is not None:
                            blk.link_pc = pc
                            blk.link = cur
                            blk.link_gen = gen
                    pc = cur.run()
                    blk = cur
                    ins += cur.n
                    self.instret = ins
                    if ins >= limit:
                        break
                break
            except Trap as t:
                n = cur.pcs.index(t.epc) if cur is not None and t.epc in cur.pcs else 0
                ins += n
                self.instret = ins
                limit -= 1  # a trap costs budget too, so a trap loop still ends the slice
                self._take_trap(t.cause, t.tval, t.epc)
                pc = self.pc
                blk = None
                if ins >= limit:
                    break
        self.pc = pc
        self._exit = False
        return ins - start

    def _translate(self, pc: int, ppage: int) -> Block:
        if len(self.blocks) >= MAX_CACHED_BLOCKS:
            # Bound the decode cache's memory (guests that keep generating code, or many
            # processes): start afresh, hot code is decoded again within microseconds.
            self.fence_i()
        blk, cacheable = self.translator(self, pc, ppage)
        if cacheable:
            self.blocks[pc] = blk
            self.page_blocks.setdefault(ppage, []).append(pc)
            idx = ppage - self._ram_base_page
            if 0 <= idx < len(self.code_pages) and not self.code_pages[idx]:
                self.code_pages[idx] = 1
                # Stores to this page must now take the slow path, which invalidates.
                self.wtlb.clear()
        return blk

    def promote_block(self, blk: Block) -> int:
        """Called by a block that turned hot: swap in its compiled form and run that."""
        blk.run = compile_block(self, blk)
        return blk.run()

    def _invalidate_code_page(self, idx: int) -> None:
        self.code_pages[idx] = 0
        self._gen += 1
        self._attention = True
        ppn = idx + self._ram_base_page
        blocks = self.blocks
        for k in self.page_blocks.pop(ppn, ()):
            b = blocks.get(k)
            if b is not None and b.ppage == ppn:
                del blocks[k]

    def _ram_written(self, first: int, last: int) -> None:
        if any(self.code_pages[first : last + 1]):
            for idx in range(first, last + 1):
                if self.code_pages[idx]:
                    self._invalidate_code_page(idx)

    def flush_translations(self) -> None:
        """Forget all decoded code and TLB entries (after code was loaded behind our back)."""
        self.blocks.clear()
        self.page_blocks.clear()
        self.code_pages[:] = bytes(len(self.code_pages))
        self._mmu_changed()

    # ------------------------------------------------------------ traps/priv

    def _take_trap(self, cause: int, tval: int, epc: int) -> None:
        code = cause & ~INTERRUPT
        is_int = cause >> 63
        deleg = self.mideleg if is_int else self.medeleg
        old = self.priv
        ms = self.mstatus
        if old <= 1 and deleg >> code & 1:
            self.scause = cause
            self.sepc = epc
            self.stval = tval
            ms = (ms & ~(SPP | SPIE | SIE)) | (SPP if old else 0) | (SPIE if ms & SIE else 0)
            vec = self.stvec
            new = 1
        else:
            self.mcause = cause
            self.mepc = epc
            self.mtval = tval
            ms = (ms & ~(MPP | MPIE | MIE)) | (old << MPP_SHIFT) | (MPIE if ms & MIE else 0)
            vec = self.mtvec
            new = 3
        base = vec & ~3
        self.pc = base + 4 * code if (vec & 1 and is_int) else base
        self.mstatus = ms
        self.priv = new
        self._mmu_changed()
        if self.trace is not None:
            kind = "interrupt" if is_int else CAUSE_NAMES.get(code, "exception")
            self.trace(f"trap {kind} (cause {cause:#x}) epc={epc:#x} tval={tval:#x} "
                       f"{_PRIV_NAMES[old]}->{_PRIV_NAMES[new]} pc={self.pc:#x}")

    def set_mstatus(self, v: int) -> None:
        """Write mstatus (already masked to writable fields), keeping caches coherent."""
        old = self.mstatus
        if (v >> MPP_SHIFT) & 3 == 2:  # reserved MPP: keep the old one
            v = (v & ~MPP) | (old & MPP)
        self.mstatus = v
        if (old ^ v) & MSTATUS_MMU_BITS:
            self._mmu_changed()

    def set_satp(self, v: int) -> None:
        """Write satp. Flushing here is more than the spec asks (software must still
        sfence.vma), but it means the TLBs never mix two address spaces."""
        self.satp = v
        self._mmu_changed()

    def _mmu_changed(self) -> None:
        """Privilege, satp or mstatus translation bits changed: drop cached translations."""
        self.itlb.clear()
        self.rtlb.clear()
        self.wtlb.clear()
        self._gen += 1
        self._attention = True
        paging = self.satp >> 60 == mmu.SATP_MODE_SV39
        dpriv = self.priv
        if dpriv == 3 and self.mstatus & MPRV:
            dpriv = (self.mstatus >> MPP_SHIFT) & 3
        self._dpriv = dpriv
        self._dpaged = paging and dpriv < 3
        self._ipaged = paging and self.priv < 3

    def ecall(self, pc: int) -> int:
        """ECALL never retires: it is an exception whose cause says who called."""
        raise Trap(8 + self.priv, 0, pc)

    def mret(self, bits: int, pc: int) -> int:
        """Return from an M-mode trap; returns the next pc (mepc)."""
        if self.priv < 3:
            raise Trap(ILLEGAL, bits, pc)
        ms = self.mstatus
        mpp = (ms >> MPP_SHIFT) & 3
        ms = (ms & ~(MIE | MPP)) | MPIE | (MIE if ms & MPIE else 0)
        if mpp != 3:
            ms &= ~MPRV
        self.mstatus = ms
        self.priv = mpp
        self._mmu_changed()
        return self.mepc

    def sret(self, bits: int, pc: int) -> int:
        """Return from an S-mode trap (illegal in U, and in S when mstatus.TSR is set)."""
        if self.priv == 0 or (self.priv == 1 and self.mstatus & TSR):
            raise Trap(ILLEGAL, bits, pc)
        ms = self.mstatus
        spp = 1 if ms & SPP else 0
        ms = (ms & ~(SIE | SPP | MPRV)) | SPIE | (SIE if ms & SPIE else 0)
        self.mstatus = ms
        self.priv = spp
        self._mmu_changed()
        return self.sepc

    def wfi(self, bits: int, pc: int, nxt: int) -> int:
        """Wait for interrupt: a no-op if one is pending in mie, else stop :meth:`run`.

        U-mode WFI is illegal because S-mode exists (a user could otherwise stall the
        kernel's scheduler); S-mode WFI is illegal under mstatus.TW.
        """
        if self.priv == 0 or (self.priv == 1 and self.mstatus & TW):
            raise Trap(ILLEGAL, bits, pc)
        if not self.mip & self.mie:
            self.waiting = True
            self._exit = True
            self._attention = True
        return nxt

    def sfence_vma(self, bits: int, pc: int, nxt: int, rs1: int, rs2: int) -> int:
        """Order page-table stores before later translations: drop every TLB entry."""
        if self.priv == 0 or (self.priv == 1 and self.mstatus & TVM):
            raise Trap(ILLEGAL, bits, pc)
        # Whole flush even for the by-address/ASID forms: refilling is cheap and this
        # keeps the TLBs free of ASID tags (the hart implements no ASID bits).
        self.itlb.clear()
        self.rtlb.clear()
        self.wtlb.clear()
        self._gen += 1
        self._attention = True
        return nxt

    def fence_i(self) -> None:
        """Make earlier stores visible to instruction fetch: forget all decoded code."""
        self._gen += 1
        self._attention = True
        self.blocks.clear()
        self.page_blocks.clear()
        self.code_pages[:] = bytes(len(self.code_pages))

    def csr_op(self, f3: int, n: int, src: int, rd: int, bits: int, pc: int, idx: int) -> None:
        """A Zicsr instruction (see :func:`vmcore.cpu.csr.csr_op`)."""
        csrmod.csr_op(self, f3, n, src, rd, bits, pc, idx)
        # A write may have enabled a pending interrupt (mie, mstatus, mideleg, ...).
        self._attention = True

    # ---------------------------------------------------------- translation

    def translate(self, va: int, acc: int, epc: int) -> int:
        """Virtual to physical for a data access (``acc`` LOAD or STORE) or fetch (FETCH)."""
        if acc == mmu.FETCH:
            if not self._ipaged:
                return va
            return mmu.walk(self, va, acc, self.priv, epc)
        if not self._dpaged:
            return va
        return mmu.walk(self, va, acc, self._dpriv, epc)

    def _fill_itlb(self, pc: int) -> int:
        ppage = self.translate(pc, mmu.FETCH, pc) >> 12
        self.itlb[pc >> 12] = ppage
        return ppage

    def fetch_parcel(self, va: int, ppage: int, epc: int) -> int:
        """The 16-bit instruction parcel at ``va``, which lies in physical page ``ppage``."""
        pa = (ppage << 12) | (va & 4095)
        ram = self.ram
        if ram.base <= pa < ram.end:
            return int(_U16.unpack_from(ram.buf, pa - ram.base)[0])
        try:
            return self.bus.read(pa, 2) & 0xFFFF
        except BusError:
            raise Trap(INSN_ACCESS, va, epc) from None

    def fetch_parcel_translated(self, va: int, epc: int) -> int:
        """A parcel on another page than its instruction's start (a straddling insn)."""
        ppage = self.translate(va, mmu.FETCH, epc) >> 12
        return self.fetch_parcel(va, ppage, epc)

    # ------------------------------------------------------------ slow paths

    def load_slow(self, va: int, size: int, signed: bool, pc: int) -> int:
        """A load the fast path could not do: TLB miss, page crossing, or MMIO."""
        if (va & 4095) + size > 4096:
            v = 0
            for i in range(size):
                v |= self._load_phys(self.translate((va + i) & M64, mmu.LOAD, pc), 1, va, pc) \
                    << (8 * i)
        else:
            pa = self.translate(va, mmu.LOAD, pc)
            v = self._load_phys(pa, size, va, pc)
            ram = self.ram
            if ram.base <= pa < ram.end:
                self.rtlb[va >> 12] = ((pa & ~4095) - ram.base) - (va & ~4095)
        if signed:
            sign = 1 << (8 * size - 1)
            v = ((v ^ sign) - sign) & M64
        return v

    def _load_phys(self, pa: int, size: int, va: int, pc: int) -> int:
        ram = self.ram
        if ram.base <= pa and pa + size <= ram.end:
            return int(_STRUCTS[size].unpack_from(ram.buf, pa - ram.base)[0])
        try:
            v = self.bus.read(pa, size)
        except BusError:
            raise Trap(LOAD_ACCESS, va, pc) from None
        if self.trace is not None:
            self.trace(f"mmio read {pa:#x}/{size} -> {v:#x} pc={pc:#x}")
        return v & ((1 << (8 * size)) - 1)

    def store_slow(self, va: int, size: int, val: int, pc: int) -> None:
        """A store the fast path could not do: TLB miss, write-protected page, MMIO, ..."""
        if (va & 4095) + size > 4096:
            # Translate every byte first, so a fault leaves memory untouched.
            pas = [self.translate((va + i) & M64, mmu.STORE, pc) for i in range(size)]
            for i, pa in enumerate(pas):
                self._store_phys(pa, 1, (val >> (8 * i)) & 255, va, pc)
            return
        pa = self.translate(va, mmu.STORE, pc)
        self._store_phys(pa, size, val, va, pc)
        ram = self.ram
        if ram.base <= pa < ram.end and not self.code_pages[(pa - ram.base) >> 12]:
            self.wtlb[va >> 12] = ((pa & ~4095) - ram.base) - (va & ~4095)

    def _store_phys(self, pa: int, size: int, val: int, va: int, pc: int) -> None:
        ram = self.ram
        if ram.base <= pa and pa + size <= ram.end:
            self.phys_write_ram(pa, size, val)
            return
        if self.trace is not None:
            self.trace(f"mmio write {pa:#x}/{size} <- {val:#x} pc={pc:#x}")
        try:
            self.bus.write(pa, size, val)
        except BusError:
            raise Trap(STORE_ACCESS, va, pc) from None

    def phys_write_ram(self, pa: int, size: int, val: int) -> None:
        """Store to RAM outside the fast path: marks the page dirty, invalidates code there."""
        ram = self.ram
        off = pa - ram.base
        _STRUCTS[size].pack_into(ram.buf, off, val)
        page = off >> 12
        log = ram.dirty_log
        if log.enabled and not log.bitmap[page]:
            log.mark(page)
        if self.code_pages[page]:
            self._invalidate_code_page(page)

    def _amo_target(self, va: int, size: int, pc: int, cause_misaligned: int,
                    acc: int) -> int:
        if va & (size - 1):
            raise Trap(cause_misaligned, va, pc)
        pa = self.translate(va, acc, pc)
        ram = self.ram
        if not (ram.base <= pa and pa + size <= ram.end):
            # Atomics to devices are not supported by this board's PMAs.
            raise Trap(LOAD_ACCESS if acc == mmu.LOAD else STORE_ACCESS, va, pc)
        return pa

    def load_reserved(self, va: int, size: int, pc: int) -> int:
        """LR: load and reserve the physical address (one hart: nothing else can steal it
        except this hart's own SC)."""
        pa = self._amo_target(va, size, pc, LOAD_MISALIGNED, mmu.LOAD)
        self.resv = pa
        v = int(_STRUCTS[size].unpack_from(self.ram.buf, pa - self.ram.base)[0])
        if size == 4 and v & 0x80000000:
            v |= 0xFFFFFFFF00000000
        return v

    def store_conditional(self, va: int, size: int, val: int, pc: int) -> int:
        """SC: store if the reservation is for this address; returns 0 on success."""
        pa = self._amo_target(va, size, pc, STORE_MISALIGNED, mmu.STORE)
        ok = self.resv == pa
        self.resv = -1
        if not ok:
            return 1
        self.phys_write_ram(pa, size, val & ((1 << (8 * size)) - 1))
        return 0

    def amo(self, op: str, va: int, size: int, val: int, pc: int) -> int:
        """An AMO: translated as a store (so it needs write permission and sets D)."""
        pa = self._amo_target(va, size, pc, STORE_MISALIGNED, mmu.STORE)
        mask = (1 << (8 * size)) - 1
        old = int(_STRUCTS[size].unpack_from(self.ram.buf, pa - self.ram.base)[0])
        src = val & mask
        sign = 1 << (8 * size - 1)
        if op == "swap":
            new = src
        elif op == "add":
            new = (old + src) & mask
        elif op == "xor":
            new = old ^ src
        elif op == "and":
            new = old & src
        elif op == "or":
            new = old | src
        elif op == "min":
            new = old if (old ^ sign) < (src ^ sign) else src
        elif op == "max":
            new = old if (old ^ sign) > (src ^ sign) else src
        elif op == "minu":
            new = min(old, src)
        else:
            new = max(old, src)
        self.phys_write_ram(pa, size, new)
        if size == 4 and old & 0x80000000:
            old |= 0xFFFFFFFF00000000
        return old


__all__ = ["MEIP", "MSIP", "MTIP", "SEIP", "SSIP", "STIP", "Hart"]
