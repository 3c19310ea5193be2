/*
 * ticker: proves timer interrupts work and that time keeps going across a
 * migration. Every 100 ms of guest time the CLINT interrupts it and it prints
 * `tick N sum=...`; the sum hashes the tick numbers so far, so the output is
 * the same on every machine and a skipped or repeated tick shows.
 *
 * `ticks=N` in the boot arguments stops it after N ticks with a pass.
 */
#include "guest.h"
#include "mix.h"

#define PERIOD (MTIME_HZ / 10)

static uint64_t deadline;
static volatile uint64_t ticks_fired;

static void arm_next(void)
{
    uint64_t now = mtime_now();
    deadline += PERIOD;
    /*
     * A deadline already in the past means we were paused or moved (e.g. live
     * migration): re-arm from now rather than firing a burst of stale ticks.
     */
    if (deadline <= now)
        deadline = now + PERIOD;
    MMIO64(CLINT_MTIMECMP) = deadline;
}

void trap_handler(struct trap_frame *frame)
{
    (void)frame;
    uint64_t cause = CSR_READ(mcause);
    if (cause == ((1UL << 63) | 7)) {
        ticks_fired++;
        arm_next();
        return;
    }
    kprintf("ticker: unexpected trap mcause=0x%lx mepc=0x%lx\n", cause, CSR_READ(mepc));
    finish_fail(2);
}

int main(unsigned long hartid, const void *fdt)
{
    (void)hartid;
    uint64_t limit = arg_u64(fdt_bootargs(fdt), "ticks", 0);
    uint64_t printed = 0;
    uint64_t sum = 0;

    deadline = mtime_now();
    arm_next();
    CSR_SET(mie, MIE_MTIE);
    for (;;) {
        /*
         * Interrupts stay masked while we check for work, and wfi wakes on a
         * pending interrupt even when masked: no tick can slip in between the
         * check and the sleep.
         */
        CSR_CLEAR(mstatus, MSTATUS_MIE);
        while (printed == ticks_fired) {
            __asm__ volatile("wfi");
            CSR_SET(mstatus, MSTATUS_MIE);
            CSR_CLEAR(mstatus, MSTATUS_MIE);
        }
        CSR_SET(mstatus, MSTATUS_MIE);
        sum = mix64(sum ^ (printed + 0x9e3779b97f4a7c15ULL));
        kprintf("tick %lu sum=0x%016lx\n", printed, sum);
        printed++;
        if (limit && printed == limit) {
            kprintf("ticker: done after %lu ticks\n", printed);
            return 0;
        }
    }
}
