/*
 * zicsr: the CSR instructions (register and immediate forms, with the rule
 * that a set/clear with x0 or 0 does not write), read-only CSRs that trap when
 * written, an unknown CSR that traps, and `misa` telling the truth.
 */
#include "isa.h"

const char isa_name[] = "zicsr";

#define MISA_EXT(c) (1UL << ((c) - 'A'))
#define ILLEGAL_INSTRUCTION 2
#define MSTATUS_SIE (1UL << 1)
#define MSTATUS_FS  (3UL << 13)

/* Runs `insn` expecting an illegal-instruction trap at exactly that instruction. */
#define EXPECT_ILLEGAL(n, insn)                                                             \
    do {                                                                                    \
        uint64_t at_;                                                                       \
        uint64_t before_ = last_trap.count;                                                 \
        trap_expected = 1;                                                                  \
        __asm__ volatile("lla %0, 1f\n1: " insn : "=&r"(at_)::"memory");                    \
        EXPECT(n, last_trap.count == before_ + 1);                                          \
        EXPECT(n, last_trap.cause == ILLEGAL_INSTRUCTION);                                  \
        EXPECT(n, last_trap.epc == at_);                                                    \
    } while (0)

/* In S-mode: read the counters; returns a bit per counter that could be read. */
static uint64_t read_counters(uint64_t unused)
{
    (void)unused;
    uint64_t readable = 0;
    uint64_t before = last_trap.count;
    trap_expected = 1;
    __asm__ volatile("rdcycle t0" ::: "t0", "memory");
    if (last_trap.count == before)
        readable |= 1;
    trap_expected = 0;
    before = last_trap.count;
    trap_expected = 1;
    __asm__ volatile("rdtime t0" ::: "t0", "memory");
    if (last_trap.count == before)
        readable |= 2;
    trap_expected = 0;
    before = last_trap.count;
    trap_expected = 1;
    __asm__ volatile("rdinstret t0" ::: "t0", "memory");
    if (last_trap.count == before)
        readable |= 4;
    trap_expected = 0;
    return readable;
}

int main(void)
{
    uint64_t old;
    uint64_t now;

    /* csrrw swaps */
    CSR_WRITE(mscratch, 0x1111);
    __asm__ volatile("csrrw %0, mscratch, %1" : "=r"(old) : "r"(0x2222UL));
    EXPECT(1, old == 0x1111);
    EXPECT(2, CSR_READ(mscratch) == 0x2222);

    /* csrrs / csrrc return the old value and set / clear the given bits */
    __asm__ volatile("csrrs %0, mscratch, %1" : "=r"(old) : "r"(0xf0f0UL));
    EXPECT(3, old == 0x2222);
    EXPECT(4, CSR_READ(mscratch) == 0xf2f2);
    __asm__ volatile("csrrc %0, mscratch, %1" : "=r"(old) : "r"(0x00ffUL));
    EXPECT(5, old == 0xf2f2);
    EXPECT(6, CSR_READ(mscratch) == 0xf200);

    /* immediate forms take a 5-bit zero-extended immediate */
    __asm__ volatile("csrrwi %0, mscratch, 31" : "=r"(old));
    EXPECT(7, old == 0xf200);
    EXPECT(8, CSR_READ(mscratch) == 31);
    __asm__ volatile("csrrci %0, mscratch, 5" : "=r"(old));
    EXPECT(9, old == 31 && CSR_READ(mscratch) == 26);
    __asm__ volatile("csrrsi %0, mscratch, 1" : "=r"(old));
    EXPECT(10, old == 26 && CSR_READ(mscratch) == 27);

    /* all 64 bits are kept */
    CSR_WRITE(mscratch, 0x8000000000000001UL);
    EXPECT(11, CSR_READ(mscratch) == 0x8000000000000001UL);

    /* csrrw with rd = x0 still writes */
    __asm__ volatile("csrrw x0, mscratch, %0" ::"r"(0x55UL));
    EXPECT(12, CSR_READ(mscratch) == 0x55);

    /* sscratch is its own register; sstatus is a view of mstatus */
    CSR_WRITE(sscratch, 0x77);
    EXPECT(13, CSR_READ(mscratch) == 0x55 && CSR_READ(sscratch) == 0x77);
    CSR_SET(sstatus, MSTATUS_SIE);
    EXPECT(14, (CSR_READ(mstatus) & MSTATUS_SIE) != 0);
    CSR_CLEAR(mstatus, MSTATUS_SIE);
    EXPECT(15, (CSR_READ(sstatus) & MSTATUS_SIE) == 0);

    /*
     * (mepc[0] should read as zero, but QEMU 7.2 keeps the bit and clears it on
     * mret instead, so it is not checked here.)
     */

    /* sstatus shows none of the M-only fields */
    CSR_SET(mstatus, 3UL << 11);                 /* MPP = M */
    EXPECT(18, (CSR_READ(sstatus) & (3UL << 11)) == 0);
    EXPECT(19, (CSR_READ(mstatus) & (3UL << 11)) == (3UL << 11));

    /* sie is a window on mie for the delegated interrupts only */
    CSR_WRITE(mie, 0);
    CSR_WRITE(mideleg, 0x222);
    CSR_WRITE(sie, 0x222);
    EXPECT(100, CSR_READ(mie) == 0x222);
    EXPECT(101, CSR_READ(sie) == 0x222);
    CSR_WRITE(mideleg, 0);
    EXPECT(102, CSR_READ(sie) == 0);
    CSR_WRITE(sie, 0x222);
    EXPECT(103, CSR_READ(mie) == 0x222);         /* not delegated: sie writes are ignored */
    CSR_WRITE(mie, 0);

    /* reading a read-only CSR is fine, with a set/clear of x0 or of immediate 0 too */
    __asm__ volatile("csrr %0, mhartid" : "=r"(now));
    EXPECT(20, now == 0);
    __asm__ volatile("csrrs %0, mvendorid, x0" : "=r"(now));
    __asm__ volatile("csrrci %0, mimpid, 0" : "=r"(now));
    __asm__ volatile("csrrs %0, cycle, x0" : "=r"(now));
    EXPECT(21, last_trap.count == 0);

    /* writing one traps as an illegal instruction, and leaves it unchanged */
    EXPECT_ILLEGAL(22, "csrw mvendorid, zero");
    EXPECT_ILLEGAL(23, "csrrs zero, mhartid, sp");
    EXPECT_ILLEGAL(24, "csrrwi zero, marchid, 1");
    EXPECT_ILLEGAL(25, "csrrsi zero, mimpid, 1");
    EXPECT_ILLEGAL(26, "csrw cycle, zero");
    EXPECT_ILLEGAL(27, "csrw instret, zero");
    EXPECT(28, CSR_READ(mhartid) == 0);

    /* a CSR number nothing implements */
    EXPECT_ILLEGAL(29, "csrr t0, 0x8ff");

    /* minstret counts: it grows across a loop of instructions */
    uint64_t before = CSR_READ(minstret);
    for (volatile int i = 0; i < 100; i++) {
    }
    EXPECT(30, CSR_READ(minstret) > before);

    /* time mirrors the CLINT's mtime */
    uint64_t t0 = mtime_now();
    uint64_t t1 = CSR_READ(time);
    uint64_t t2 = mtime_now();
    EXPECT(31, t0 <= t1 && t1 <= t2);

    /* mcounteren decides which counters S-mode may read; a denied read is illegal */
    CSR_WRITE(mcounteren, 0);
    EXPECT(32, enter_mode(MODE_S, read_counters, 0) == 0);
    EXPECT(33, last_trap.cause == ILLEGAL_INSTRUCTION);
    CSR_WRITE(mcounteren, 7);
    EXPECT(34, CSR_READ(mcounteren) == 7);
    EXPECT(35, enter_mode(MODE_S, read_counters, 0) == 7);
    CSR_WRITE(mcounteren, 2);
    EXPECT(36, enter_mode(MODE_S, read_counters, 0) == 2);

    /* misa: RV64, and the extensions this machine has */
    uint64_t misa = CSR_READ(misa);
    EXPECT(40, misa >> 62 == 2);
    EXPECT(41, (misa & MISA_EXT('I')) != 0);
    EXPECT(42, (misa & MISA_EXT('M')) != 0);
    EXPECT(43, (misa & MISA_EXT('A')) != 0);
    EXPECT(44, (misa & MISA_EXT('C')) != 0);
    EXPECT(45, (misa & MISA_EXT('S')) != 0);
    EXPECT(46, (misa & MISA_EXT('U')) != 0);
    EXPECT(47, (misa & MISA_EXT('E')) == 0);
    /*
     * F and D are absent on a machine built as RV64IMAC (Ferry, or QEMU with
     * f=false,d=false), present on QEMU's default CPU. Either way misa must tell
     * the truth: D needs F, and F means the FP state field in mstatus works.
     */
    if (misa & MISA_EXT('D'))
        EXPECT(48, (misa & MISA_EXT('F')) != 0);
    if (misa & MISA_EXT('F')) {
        CSR_SET(mstatus, MSTATUS_FS);
        EXPECT(49, (CSR_READ(mstatus) & MSTATUS_FS) != 0);
        CSR_CLEAR(mstatus, MSTATUS_FS);
    }

    isa_pass();
}
