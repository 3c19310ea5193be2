/*
 * sbi-hello: an S-mode payload for SBI firmware (OpenSBI's fw_jump enters it
 * at 0x80200000). It touches the machine only through SBI calls: the debug
 * console (or the legacy putchar where DBCN is missing), the base extension's
 * probes, timer interrupts from the TIME extension, and shutdown through SRST.
 * It proves the firmware-to-payload chain works, and prints the same lines on
 * any machine that runs the same firmware correctly.
 */
#include "guest.h"

#define EXT_LEGACY_PUTCHAR 0x01
#define EXT_BASE 0x10
#define EXT_TIME 0x54494d45
#define EXT_IPI  0x735049
#define EXT_RFNC 0x52464e43
#define EXT_HSM  0x48534d
#define EXT_SRST 0x53525354
#define EXT_DBCN 0x4442434e

#define BASE_SPEC_VERSION 0
#define BASE_PROBE        3
#define DBCN_WRITE_BYTE   2
#define SRST_RESET        0
#define SRST_SHUTDOWN     0
#define SRST_NO_REASON    0
#define SRST_FAILURE      1

#define SIE_STIE   (1UL << 5)
#define SSTATUS_SIE (1UL << 1)
#define TIMER_INTERRUPT ((1UL << 63) | 5)
#define TICKS 3

struct sbiret {
    long error;
    long value;
};

static struct sbiret sbi_call(unsigned long ext, unsigned long fid, unsigned long arg0,
                              unsigned long arg1, unsigned long arg2)
{
    register unsigned long a0 __asm__("a0") = arg0;
    register unsigned long a1 __asm__("a1") = arg1;
    register unsigned long a2 __asm__("a2") = arg2;
    register unsigned long a6 __asm__("a6") = fid;
    register unsigned long a7 __asm__("a7") = ext;
    __asm__ volatile("ecall" : "+r"(a0), "+r"(a1) : "r"(a2), "r"(a6), "r"(a7) : "memory");
    return (struct sbiret){(long)a0, (long)a1};
}

static void dbcn_putc(char c) { sbi_call(EXT_DBCN, DBCN_WRITE_BYTE, (uint8_t)c, 0, 0); }

static void legacy_putc(char c)
{
    register unsigned long a0 __asm__("a0") = (uint8_t)c;
    register unsigned long a7 __asm__("a7") = EXT_LEGACY_PUTCHAR;
    __asm__ volatile("ecall" : "+r"(a0) : "r"(a7) : "memory");
}

static int probe(unsigned long ext)
{
    struct sbiret r = sbi_call(EXT_BASE, BASE_PROBE, ext, 0, 0);
    return r.error == 0 && r.value != 0;
}

__attribute__((noreturn)) static void shutdown(unsigned long reason)
{
    struct sbiret r = sbi_call(EXT_SRST, SRST_RESET, SRST_SHUTDOWN, reason, 0);
    /* Only reached if the firmware refused or could not power off: say so, then stop here. */
    kprintf("sbi-hello: SRST shutdown returned error %ld\n", r.error);
    for (;;)
        __asm__ volatile("wfi");
}

void finish_pass(void) { shutdown(SRST_NO_REASON); }

void finish_fail(unsigned code)
{
    kprintf("sbi-hello: failed (%u)\n", code);
    shutdown(SRST_FAILURE);
}

static uint64_t rdtime(void)
{
    uint64_t t;
    __asm__ volatile("rdtime %0" : "=r"(t));
    return t;
}

static volatile unsigned ticks;
static uint64_t next_deadline;

static void set_timer(uint64_t when) { sbi_call(EXT_TIME, 0, when, 0, 0); }

void trap_handler(struct trap_frame *frame)
{
    (void)frame;
    uint64_t cause = CSR_READ(scause);
    if (cause != TIMER_INTERRUPT) {
        kprintf("sbi-hello: unexpected trap scause=0x%lx sepc=0x%lx\n", cause, CSR_READ(sepc));
        finish_fail(2);
    }
    ticks++;
    /* A new deadline clears the pending timer interrupt; the last one stops them. */
    if (ticks < TICKS) {
        next_deadline += MTIME_HZ / 100;
        set_timer(next_deadline);
    } else {
        set_timer(UINT64_MAX);
    }
}

static const char *yes_no(int b) { return b ? "yes" : "no"; }

int main(unsigned long hartid, const void *fdt)
{
    (void)fdt;
    int have_dbcn = probe(EXT_DBCN);
    console_putc = have_dbcn ? dbcn_putc : legacy_putc;

    kprintf("sbi-hello: S-mode payload on hart %lu\n", hartid);
    long spec = sbi_call(EXT_BASE, BASE_SPEC_VERSION, 0, 0, 0).value;
    kprintf("sbi-hello: SBI specification %ld.%ld\n", (spec >> 24) & 0x7f, spec & 0xffffff);
    kprintf("sbi-hello: extensions TIME=%s IPI=%s RFNC=%s HSM=%s SRST=%s DBCN=%s\n",
            yes_no(probe(EXT_TIME)), yes_no(probe(EXT_IPI)), yes_no(probe(EXT_RFNC)),
            yes_no(probe(EXT_HSM)), yes_no(probe(EXT_SRST)), yes_no(have_dbcn));
    kprintf("sbi-hello: console through %s\n", have_dbcn ? "DBCN" : "the legacy putchar");
    if (!probe(EXT_TIME) || !probe(EXT_SRST)) {
        kprintf("sbi-hello: needs the TIME and SRST extensions\n");
        finish_fail(3);
    }

    next_deadline = rdtime() + MTIME_HZ / 100;
    set_timer(next_deadline);
    CSR_SET(sie, SIE_STIE);
    unsigned seen = 0;
    while (seen < TICKS) {
        /* wfi with SIE clear still wakes on the pending interrupt; the tick is taken just after. */
        CSR_CLEAR(sstatus, SSTATUS_SIE);
        if (ticks == seen)
            __asm__ volatile("wfi");
        CSR_SET(sstatus, SSTATUS_SIE);
        while (seen < ticks)
            kprintf("sbi-hello: timer interrupt %u\n", ++seen);
    }
    CSR_CLEAR(sstatus, SSTATUS_SIE);
    CSR_CLEAR(sie, SIE_STIE);

    kprintf("sbi-hello: shutting down through SRST\n");
    finish_pass();
}
