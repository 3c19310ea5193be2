/*
 * traps: synchronous exceptions and how they are routed. ecall from each mode,
 * mcause/mepc/mtval, illegal instructions reporting their bits, misaligned
 * accesses (trapped or emulated, but consistently and correctly), delegation
 * to S-mode, vectored mtvec, mret/sret mode changes, and mstatus.TSR/TW/TVM.
 */
#include "isa.h"

const char isa_name[] = "traps";

#define CAUSE_FETCH_ACCESS     1
#define CAUSE_BREAKPOINT       3
#define CAUSE_LOAD_ACCESS      5
#define CAUSE_STORE_ACCESS     7
#define CAUSE_MISALIGNED_LOAD  4
#define CAUSE_MISALIGNED_STORE 6
#define CAUSE_ILLEGAL          2
#define CAUSE_ECALL_U          8
#define CAUSE_ECALL_S          9
#define CAUSE_ECALL_M          11
#define INTERRUPT              (1UL << 63)

#define MSTATUS_SIE  (1UL << 1)
#define MSTATUS_MPIE (1UL << 7)
#define MSTATUS_SPP  (1UL << 8)
#define MSTATUS_MPP  (3UL << 11)
#define MSTATUS_TVM  (1UL << 20)
#define MSTATUS_TW   (1UL << 21)
#define MSTATUS_TSR  (1UL << 22)
#define SIE_SSIE     (1UL << 1)
#define SIP_SSIP     (1UL << 1)

extern char vector_table[];
extern volatile uint64_t vector_msi_hits;
extern volatile uint64_t vector_msi_cause;

static uint64_t mpp(uint64_t status) { return (status & MSTATUS_MPP) >> 11; }

/* ecall in the current mode; returns the cause M-mode saw. */
static uint64_t ecall_here(uint64_t unused)
{
    (void)unused;
    uint64_t at;
    RUN_TRAPPING(last_trap, trap_expected, at, "ecall");
    return last_trap.epc == at ? last_trap.cause : 0;
}

/* An illegal instruction in the current mode; returns what the trap reported as mtval. */
static uint64_t illegal_here(uint64_t unused)
{
    (void)unused;
    uint64_t at;
    RUN_TRAPPING(last_trap, trap_expected, at, ".word 0x0000006b");
    return last_trap.epc == at && last_trap.cause == CAUSE_ILLEGAL ? last_trap.tval : 1;
}

/* U-mode code, delegated: the trap lands in S-mode. Returns scause, or 0 if wrong. */
static uint64_t delegated_ecall(uint64_t unused)
{
    (void)unused;
    uint64_t at;
    RUN_TRAPPING(s_last_trap, s_trap_expected, at, "ecall");
    return s_last_trap.epc == at ? s_last_trap.cause : 0;
}

static uint64_t delegated_illegal(uint64_t unused)
{
    (void)unused;
    uint64_t at;
    RUN_TRAPPING(s_last_trap, s_trap_expected, at, ".word 0x0000006b");
    if (s_last_trap.epc != at || s_last_trap.cause != CAUSE_ILLEGAL)
        return 1;
    return s_last_trap.tval;
}

/* In S-mode: raise a supervisor software interrupt delegated to S and take it. */
static volatile uint64_t ssi_cause;
static int ssi_hook(struct trap_frame *frame)
{
    (void)frame;
    uint64_t cause = CSR_READ(scause);
    if (cause != (INTERRUPT | 1))
        return 0;
    ssi_cause = cause;
    CSR_CLEAR(sip, SIP_SSIP);
    return 1;
}

static uint64_t take_ssi(uint64_t unused)
{
    (void)unused;
    CSR_SET(sie, SIE_SSIE);
    CSR_SET(sstatus, MSTATUS_SIE);
    CSR_SET(sip, SIP_SSIP);
    for (volatile int i = 0; i < 100 && !ssi_cause; i++) {
    }
    CSR_CLEAR(sstatus, MSTATUS_SIE);
    CSR_CLEAR(sie, SIE_SSIE);
    return ssi_cause;
}

/* In S-mode: sret down to U-mode code that reports its mode with an exit call. */
static void u_report(void)
{
    /* an ordinary ecall, to show M-mode sees it coming from U */
    trap_expected = 1;
    __asm__ volatile("ecall" ::: "memory");
    if (last_trap.cause == CAUSE_ECALL_U && mpp(last_trap.status) == MODE_U)
        exit_to_m(0x5555);
    exit_to_m(0xbad);
}

static uint64_t sret_to_user(uint64_t unused)
{
    (void)unused;
    CSR_CLEAR(sstatus, MSTATUS_SPP);
    CSR_WRITE(sepc, (uint64_t)(uintptr_t)u_report);
    __asm__ volatile("sret");
    return 0xdead;
}

/* In S-mode, under TSR / TW / TVM: each instruction must trap to M as illegal. */
static uint64_t s_sret(uint64_t unused)
{
    (void)unused;
    uint64_t at;
    CSR_WRITE(sepc, 0);
    RUN_TRAPPING(last_trap, trap_expected, at, "sret");
    return last_trap.cause == CAUSE_ILLEGAL && last_trap.epc == at;
}

static uint64_t s_wfi(uint64_t unused)
{
    (void)unused;
    uint64_t at;
    RUN_TRAPPING(last_trap, trap_expected, at, "wfi");
    return last_trap.cause == CAUSE_ILLEGAL && last_trap.epc == at;
}

static uint64_t s_satp_and_sfence(uint64_t unused)
{
    (void)unused;
    uint64_t at;
    RUN_TRAPPING(last_trap, trap_expected, at, "csrr t0, satp");
    if (last_trap.cause != CAUSE_ILLEGAL || last_trap.epc != at)
        return 0;
    RUN_TRAPPING(last_trap, trap_expected, at, "sfence.vma");
    return last_trap.cause == CAUSE_ILLEGAL && last_trap.epc == at;
}

static uint64_t s_satp_read(uint64_t unused)
{
    (void)unused;
    return CSR_READ(satp) + 1;
}

/*
 * Misaligned loads and stores may trap or be emulated. Either is fine, if it
 * is consistent and correct: a trap reports the right cause and address and
 * leaves memory alone; emulation gives the right value.
 */
static uint8_t misaligned_buf[32] __attribute__((aligned(16)));

static void check_misaligned(void)
{
    for (int i = 0; i < 32; i++)
        misaligned_buf[i] = (uint8_t)(0x10 + i);
    uint64_t addr = (uint64_t)(uintptr_t)&misaligned_buf[1];
    uint64_t value = 0;
    uint64_t before = last_trap.count;

    isa_current = 30;
    trap_expected = 1;
    __asm__ volatile("ld %0, 0(%1)" : "+r"(value) : "r"(addr) : "memory");
    int load_trapped = last_trap.count != before;
    trap_expected = 0;
    if (load_trapped) {
        EXPECT(31, last_trap.cause == CAUSE_MISALIGNED_LOAD && last_trap.tval == addr);
    } else {
        EXPECT(32, value == 0x1817161514131211UL);
    }

    before = last_trap.count;
    isa_current = 33;
    trap_expected = 1;
    __asm__ volatile("sw %0, 0(%1)" ::"r"(0xa1a2a3a4UL), "r"(addr + 2) : "memory");
    int store_trapped = last_trap.count != before;
    trap_expected = 0;
    EXPECT(34, store_trapped == load_trapped);
    if (store_trapped) {
        EXPECT(35, last_trap.cause == CAUSE_MISALIGNED_STORE && last_trap.tval == addr + 2);
        EXPECT(36, misaligned_buf[3] == 0x13 && misaligned_buf[6] == 0x16);
    } else {
        EXPECT(37, misaligned_buf[2] == 0x12 && misaligned_buf[3] == 0xa4 &&
                       misaligned_buf[6] == 0xa1 && misaligned_buf[7] == 0x17);
    }
}

/* Resumes a fetch fault at the caller: its mepc is the bad target, not an instruction. */
static int fetch_fault_hook(struct trap_frame *frame)
{
    uint64_t cause = CSR_READ(mcause);
    if (cause != CAUSE_FETCH_ACCESS || !trap_expected)
        return 0;
    trap_expected = 0;
    last_trap.cause = cause;
    last_trap.epc = CSR_READ(mepc);
    last_trap.tval = CSR_READ(mtval);
    last_trap.count++;
    CSR_WRITE(mepc, frame->x[1]);
    return 1;
}

/*
 * Accesses where nothing is (just past the end of RAM) raise access faults
 * that report the address.
 */
static void check_access_faults(const void *fdt)
{
    uint64_t ram_base = RAM_BASE;
    uint64_t ram_size = 0;
    EXPECT(80, fdt_memory(fdt, &ram_base, &ram_size) == 0);
    uint64_t hole = ram_base + ram_size;
    uint64_t before = last_trap.count;
    uint64_t value = 0;

    isa_current = 81;
    trap_expected = 1;
    __asm__ volatile("ld %0, 0(%1)" : "+r"(value) : "r"(hole) : "memory");
    EXPECT(82, last_trap.count == before + 1);
    EXPECT(83, last_trap.cause == CAUSE_LOAD_ACCESS && last_trap.tval == hole);

    isa_current = 84;
    trap_expected = 1;
    __asm__ volatile("sd %0, 8(%1)" ::"r"(value), "r"(hole) : "memory");
    EXPECT(85, last_trap.count == before + 2);
    EXPECT(86, last_trap.cause == CAUSE_STORE_ACCESS && last_trap.tval == hole + 8);

    isa_trap_hook = fetch_fault_hook;
    isa_current = 87;
    trap_expected = 1;
    ((void (*)(void))(uintptr_t)hole)();
    isa_trap_hook = 0;
    EXPECT(88, last_trap.count == before + 3);
    EXPECT(89, last_trap.cause == CAUSE_FETCH_ACCESS && last_trap.tval == hole);
}

int main(unsigned long hartid, const void *fdt)
{
    (void)hartid;
    uint64_t at;

    /* ecall from M: cause 11, mepc at the ecall, mret resumes after it */
    isa_current = 1;
    RUN_TRAPPING(last_trap, trap_expected, at, "ecall");
    EXPECT(2, last_trap.cause == CAUSE_ECALL_M);
    EXPECT(3, last_trap.epc == at);
    EXPECT(4, mpp(last_trap.status) == MODE_M);

    /* illegal instruction: mtval holds the instruction's bits */
    isa_current = 5;
    RUN_TRAPPING(last_trap, trap_expected, at, ".word 0x0000006b");
    EXPECT(6, last_trap.cause == CAUSE_ILLEGAL && last_trap.epc == at);
    EXPECT(7, last_trap.tval == 0x6b);
    isa_current = 8;
    RUN_TRAPPING(last_trap, trap_expected, at, "csrw mhartid, t0");
    EXPECT(9, last_trap.tval == 0xf1429073);

    /* ebreak: cause 3, mtval the address of the ebreak or zero; also the compressed form */
    isa_current = 15;
    RUN_TRAPPING(last_trap, trap_expected, at, "ebreak");
    EXPECT(16, last_trap.cause == CAUSE_BREAKPOINT && last_trap.epc == at);
    EXPECT(17, last_trap.tval == at || last_trap.tval == 0);
    isa_current = 18;
    RUN_TRAPPING(last_trap, trap_expected, at, "c.ebreak");
    EXPECT(19, last_trap.cause == CAUSE_BREAKPOINT && last_trap.epc == at);

    /* ecall from S and from U, and the previous mode recorded in MPP */
    EXPECT(10, enter_mode(MODE_S, ecall_here, 0) == CAUSE_ECALL_S);
    EXPECT(11, mpp(last_trap.status) == MODE_S);
    EXPECT(12, enter_mode(MODE_U, ecall_here, 0) == CAUSE_ECALL_U);
    EXPECT(13, mpp(last_trap.status) == MODE_U);
    EXPECT(14, enter_mode(MODE_U, illegal_here, 0) == 0x6b);

    /* mret: MIE <- MPIE, MPIE <- 1, MPP <- U */
    CSR_WRITE(mie, 0);
    CSR_CLEAR(mstatus, MSTATUS_MIE);
    CSR_SET(mstatus, MSTATUS_MPP | MSTATUS_MPIE);
    __asm__ volatile("lla t0, 1f\n csrw mepc, t0\n mret\n1:" ::: "t0", "memory");
    uint64_t status = CSR_READ(mstatus);
    EXPECT(20, (status & MSTATUS_MIE) != 0);
    EXPECT(21, (status & MSTATUS_MPIE) != 0);
    EXPECT(22, mpp(status) == MODE_U);
    CSR_CLEAR(mstatus, MSTATUS_MIE);

    check_misaligned();
    check_access_faults(fdt);

    /* delegation: U-mode ecall and illegal instruction go to S-mode's stvec */
    CSR_WRITE(stvec, (uint64_t)(uintptr_t)s_trap_entry);
    CSR_WRITE(medeleg, (1UL << CAUSE_ECALL_U) | (1UL << CAUSE_ILLEGAL));
    uint64_t m_traps = last_trap.count;
    EXPECT(40, enter_mode(MODE_U, delegated_ecall, 0) == CAUSE_ECALL_U);
    EXPECT(41, (s_last_trap.status & MSTATUS_SPP) == 0);
    EXPECT(42, last_trap.count == m_traps);
    EXPECT(43, enter_mode(MODE_U, delegated_illegal, 0) == 0x6b);
    /* traps taken in M-mode are never delegated */
    isa_current = 44;
    RUN_TRAPPING(last_trap, trap_expected, at, ".word 0x0000006b");
    EXPECT(45, last_trap.cause == CAUSE_ILLEGAL);
    CSR_WRITE(medeleg, 0);

    /* interrupt delegation: a supervisor software interrupt handled in S-mode */
    isa_s_trap_hook = ssi_hook;
    CSR_WRITE(mideleg, 1UL << 1);
    EXPECT(46, enter_mode(MODE_S, take_ssi, 0) == (INTERRUPT | 1));
    CSR_WRITE(mideleg, 0);
    isa_s_trap_hook = 0;

    /* sret from S drops to U (SPP = 0) */
    EXPECT(50, enter_mode(MODE_S, sret_to_user, 0) == 0x5555);

    /* TSR, TW, TVM turn sret, wfi, satp and sfence.vma in S-mode into illegal instructions */
    CSR_SET(mstatus, MSTATUS_TSR);
    EXPECT(60, enter_mode(MODE_S, s_sret, 0) == 1);
    CSR_CLEAR(mstatus, MSTATUS_TSR);
    CSR_SET(mstatus, MSTATUS_TW);
    EXPECT(61, enter_mode(MODE_S, s_wfi, 0) == 1);
    CSR_CLEAR(mstatus, MSTATUS_TW);
    CSR_SET(mstatus, MSTATUS_TVM);
    EXPECT(62, enter_mode(MODE_S, s_satp_and_sfence, 0) == 1);
    CSR_CLEAR(mstatus, MSTATUS_TVM);
    EXPECT(63, enter_mode(MODE_S, s_satp_read, 0) == 1);   /* satp is 0 (bare) */

    /* vectored mtvec: interrupts jump to base + 4 x cause, exceptions to base */
    CSR_WRITE(mtvec, (uint64_t)(uintptr_t)vector_table | 1);
    EXPECT(70, (CSR_READ(mtvec) & 3) == 1);
    CSR_SET(mie, MIE_MSIE);
    MMIO32(CLINT_MSIP) = 1;
    CSR_SET(mstatus, MSTATUS_MIE);
    for (volatile int i = 0; i < 100 && !vector_msi_hits; i++) {
    }
    CSR_CLEAR(mstatus, MSTATUS_MIE);
    CSR_CLEAR(mie, MIE_MSIE);
    EXPECT(71, vector_msi_hits == 1);
    EXPECT(72, vector_msi_cause == (INTERRUPT | 3));
    isa_current = 73;
    RUN_TRAPPING(last_trap, trap_expected, at, "ecall");
    EXPECT(74, last_trap.cause == CAUSE_ECALL_M && last_trap.epc == at);
    CSR_WRITE(mtvec, (uint64_t)(uintptr_t)trap_entry);

    isa_pass();
}
