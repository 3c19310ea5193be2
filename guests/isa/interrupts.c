/*
 * interrupts: the CLINT's software and timer interrupts, their priority when
 * both are pending, wfi waking on a pending interrupt even when interrupts are
 * masked, and an external interrupt from the UART (transmitter empty, IER bit
 * 1) routed through PLIC source 10 to hart 0's M-mode context, with the
 * threshold, claim and complete.
 */
#include "isa.h"

const char isa_name[] = "interrupts";

#define INTERRUPT (1UL << 63)
#define IRQ_MSI 3
#define IRQ_MTI 7
#define IRQ_MEI 11
#define MIP_MSIP (1UL << IRQ_MSI)
#define MIP_MTIP (1UL << IRQ_MTI)
#define MIP_MEIP (1UL << IRQ_MEI)

#define IRQ_STI 5
#define IRQ_SEI 9
#define MIP_STIP (1UL << IRQ_STI)
#define MIP_SEIP (1UL << IRQ_SEI)
#define SSTATUS_SIE (1UL << 1)

#define PLIC_PRIORITY(src) (PLIC_BASE + 4 * (src))
#define PLIC_ENABLE_S      (PLIC_BASE + 0x2080)
#define PLIC_THRESHOLD_S   (PLIC_BASE + 0x201000)
#define PLIC_CLAIM_S       (PLIC_BASE + 0x201004)
#define PLIC_ENABLE_M      (PLIC_BASE + 0x2000)
#define PLIC_THRESHOLD_M   (PLIC_BASE + 0x200000)
#define PLIC_CLAIM_M       (PLIC_BASE + 0x200004)
#define UART_IER_THRI      0x02

static volatile uint64_t taken[8];
static volatile unsigned ntaken;
static volatile uint32_t claimed;

static void record(uint64_t cause)
{
    if (ntaken < 8)
        taken[ntaken] = cause;
    ntaken++;
}

/* Each handler silences its source, so the interrupt is taken exactly once. */
static int irq_hook(struct trap_frame *frame)
{
    (void)frame;
    uint64_t cause = CSR_READ(mcause);
    if (!(cause & INTERRUPT))
        return 0;
    record(cause);
    switch (cause & ~INTERRUPT) {
    case IRQ_MSI:
        MMIO32(CLINT_MSIP) = 0;
        break;
    case IRQ_MTI:
        MMIO64(CLINT_MTIMECMP) = UINT64_MAX;
        break;
    case IRQ_MEI:
        claimed = MMIO32(PLIC_CLAIM_M);
        MMIO8(UART_BASE + UART_IER) = 0;
        MMIO32(PLIC_CLAIM_M) = claimed;
        break;
    default:
        isa_fail(isa_current);
    }
    return 1;
}

static void reset_log(void) { ntaken = 0; }

/*
 * S-mode side, as a kernel under SBI firmware sees it: the timer interrupt the
 * firmware injects through mip.STIP, and the UART through the PLIC's S context.
 */
static volatile uint32_t s_claimed;

static int s_irq_hook(struct trap_frame *frame)
{
    (void)frame;
    uint64_t cause = CSR_READ(scause);
    if (!(cause & INTERRUPT))
        return 0;
    record(cause);
    if ((cause & ~INTERRUPT) == IRQ_SEI) {
        s_claimed = MMIO32(PLIC_CLAIM_S);
        MMIO8(UART_BASE + UART_IER) = 0;
        MMIO32(PLIC_CLAIM_S) = s_claimed;
    } else if ((cause & ~INTERRUPT) == IRQ_STI) {
        /* S cannot clear STIP itself: ask M, as a kernel asks the SBI for a new timer. */
        __asm__ volatile("ecall" ::: "memory");
    } else {
        isa_fail(isa_current);
    }
    return 1;
}

/* M-mode's answer to that ecall: clear the injected timer interrupt. */
static int m_clear_stip_hook(struct trap_frame *frame)
{
    if (CSR_READ(mcause) != 9 || CSR_READ(mepc) == (uint64_t)(uintptr_t)lower_exit_ecall)
        return irq_hook(frame);
    CSR_CLEAR(mip, MIP_STIP);
    CSR_WRITE(mepc, CSR_READ(mepc) + 4);
    return 1;
}

static uint64_t s_take(uint64_t enable)
{
    CSR_WRITE(sie, enable);
    CSR_SET(sstatus, SSTATUS_SIE);
    for (volatile int i = 0; i < 50; i++) {
    }
    CSR_CLEAR(sstatus, SSTATUS_SIE);
    CSR_WRITE(sie, 0);
    return ntaken;
}

/* In S-mode with SIE clear: an M-mode interrupt still preempts it. */
static uint64_t s_spin(uint64_t unused)
{
    (void)unused;
    for (volatile int i = 0; i < 50 && !ntaken; i++) {
    }
    return ntaken;
}

/* Lets pending interrupts in for a moment. */
static void open_window(void)
{
    CSR_SET(mstatus, MSTATUS_MIE);
    for (volatile int i = 0; i < 50; i++) {
    }
    CSR_CLEAR(mstatus, MSTATUS_MIE);
}

int main(void)
{
    isa_trap_hook = irq_hook;
    CSR_CLEAR(mstatus, MSTATUS_MIE);
    MMIO64(CLINT_MTIMECMP) = UINT64_MAX;

    /* software interrupt: msip shows in mip, and is taken once enabled */
    CSR_WRITE(mie, MIE_MSIE);
    MMIO32(CLINT_MSIP) = 1;
    EXPECT(1, (CSR_READ(mip) & MIP_MSIP) != 0);
    EXPECT(2, ntaken == 0);                      /* masked by mstatus.MIE */
    open_window();
    EXPECT(3, ntaken == 1 && taken[0] == (INTERRUPT | IRQ_MSI));
    EXPECT(4, (CSR_READ(mip) & MIP_MSIP) == 0);

    /* timer interrupt: pending once mtime reaches mtimecmp, cleared by a later mtimecmp */
    reset_log();
    CSR_WRITE(mie, MIE_MTIE);
    uint64_t due = mtime_now() + 100;
    MMIO64(CLINT_MTIMECMP) = due;
    while (!(CSR_READ(mip) & MIP_MTIP)) {
    }
    EXPECT(10, mtime_now() >= due);
    open_window();
    EXPECT(11, ntaken == 1 && taken[0] == (INTERRUPT | IRQ_MTI));
    EXPECT(12, (CSR_READ(mip) & MIP_MTIP) == 0);

    /* both pending: the software interrupt has priority over the timer */
    reset_log();
    CSR_WRITE(mie, MIE_MSIE | MIE_MTIE);
    MMIO64(CLINT_MTIMECMP) = 0;
    MMIO32(CLINT_MSIP) = 1;
    EXPECT(20, (CSR_READ(mip) & (MIP_MSIP | MIP_MTIP)) == (MIP_MSIP | MIP_MTIP));
    open_window();
    EXPECT(21, ntaken == 2);
    EXPECT(22, taken[0] == (INTERRUPT | IRQ_MSI) && taken[1] == (INTERRUPT | IRQ_MTI));

    /* wfi wakes when an enabled interrupt becomes pending, though MIE masks the trap */
    reset_log();
    CSR_WRITE(mie, MIE_MTIE);
    uint64_t wake = mtime_now() + MTIME_HZ / 1000;
    MMIO64(CLINT_MTIMECMP) = wake;
    while (!(CSR_READ(mip) & MIP_MTIP))
        __asm__ volatile("wfi");
    EXPECT(30, mtime_now() >= wake);
    EXPECT(31, ntaken == 0);
    MMIO64(CLINT_MTIMECMP) = UINT64_MAX;

    /* UART transmitter-empty interrupt through the PLIC */
    reset_log();
    CSR_WRITE(mie, MIE_MEIE);
    MMIO32(PLIC_PRIORITY(PLIC_UART_IRQ)) = 1;
    MMIO32(PLIC_ENABLE_M) = 1u << PLIC_UART_IRQ;
    MMIO32(PLIC_THRESHOLD_M) = 1;               /* priority 1 does not exceed threshold 1 */
    MMIO8(UART_BASE + UART_IER) = UART_IER_THRI;
    for (volatile int i = 0; i < 50; i++) {
    }
    EXPECT(40, (CSR_READ(mip) & MIP_MEIP) == 0);
    MMIO32(PLIC_THRESHOLD_M) = 0;
    for (volatile int i = 0; i < 50; i++) {
    }
    EXPECT(41, (CSR_READ(mip) & MIP_MEIP) != 0);
    open_window();
    EXPECT(42, ntaken == 1 && taken[0] == (INTERRUPT | IRQ_MEI));
    EXPECT(43, claimed == PLIC_UART_IRQ);
    EXPECT(44, (CSR_READ(mip) & MIP_MEIP) == 0);
    EXPECT(45, MMIO32(PLIC_CLAIM_M) == 0);       /* nothing left to claim */

    /* a disabled source does not interrupt */
    MMIO32(PLIC_ENABLE_M) = 0;
    MMIO8(UART_BASE + UART_IER) = UART_IER_THRI;
    for (volatile int i = 0; i < 50; i++) {
    }
    EXPECT(46, (CSR_READ(mip) & MIP_MEIP) == 0);
    MMIO8(UART_BASE + UART_IER) = 0;
    CSR_WRITE(mie, 0);

    /* M-mode interrupts are always enabled while the hart runs in S-mode */
    reset_log();
    CSR_WRITE(mie, MIE_MSIE);
    MMIO32(CLINT_MSIP) = 1;
    EXPECT(50, enter_mode(MODE_S, s_spin, 0) == 1);
    EXPECT(51, taken[0] == (INTERRUPT | IRQ_MSI));
    CSR_WRITE(mie, 0);

    /* a supervisor timer interrupt injected by M through mip.STIP, delegated to S */
    reset_log();
    CSR_WRITE(stvec, (uint64_t)(uintptr_t)s_trap_entry);
    isa_s_trap_hook = s_irq_hook;
    isa_trap_hook = m_clear_stip_hook;
    CSR_WRITE(mideleg, MIP_STIP | MIP_SEIP);
    CSR_SET(mip, MIP_STIP);
    EXPECT(60, (CSR_READ(sip) & MIP_STIP) != 0);
    EXPECT(61, enter_mode(MODE_S, s_take, MIP_STIP) == 1);
    EXPECT(62, taken[0] == (INTERRUPT | IRQ_STI));
    EXPECT(63, (CSR_READ(mip) & MIP_STIP) == 0);

    /* the UART through the PLIC's supervisor context, delegated to S */
    reset_log();
    isa_trap_hook = irq_hook;
    MMIO32(PLIC_ENABLE_S) = 1u << PLIC_UART_IRQ;
    MMIO32(PLIC_THRESHOLD_S) = 0;
    MMIO8(UART_BASE + UART_IER) = UART_IER_THRI;
    for (volatile int i = 0; i < 50; i++) {
    }
    EXPECT(70, (CSR_READ(mip) & MIP_SEIP) != 0);
    EXPECT(71, (CSR_READ(mip) & MIP_MEIP) == 0);    /* the M context has it disabled */
    EXPECT(72, enter_mode(MODE_S, s_take, MIP_SEIP) == 1);
    EXPECT(73, taken[0] == (INTERRUPT | IRQ_SEI) && s_claimed == PLIC_UART_IRQ);
    EXPECT(74, (CSR_READ(mip) & MIP_SEIP) == 0);
    MMIO32(PLIC_ENABLE_S) = 0;
    CSR_WRITE(mideleg, 0);

    isa_pass();
}
