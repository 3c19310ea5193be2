/*
 * What every ISA program shares: the report lines a test matches, and a trap
 * handler that records expected traps and turns unexpected ones into a FAIL
 * naming the check that was running.
 */
#include "isa.h"

volatile unsigned long isa_current;
volatile struct trap_record last_trap;
volatile int trap_expected;
int (*isa_trap_hook)(struct trap_frame *frame);
volatile struct trap_record s_last_trap;
volatile int s_trap_expected;
int (*isa_s_trap_hook)(struct trap_frame *frame);

static int is_exit_call(uint64_t cause, uint64_t epc)
{
    return (cause == 8 || cause == 9) && epc == (uint64_t)(uintptr_t)lower_exit_ecall;
}

void exit_to_m(uint64_t value)
{
    ((void (*)(uint64_t))(uintptr_t)lower_exit)(value);
    for (;;) {
    }
}

void isa_pass(void)
{
    kprintf("PASS %s\n", isa_name);
    finish_pass();
}

void isa_fail(unsigned long test)
{
    kprintf("FAIL %s test=%lu\n", isa_name, test);
    finish_fail(1);
}

/*
 * Length of the instruction that trapped. It is read as the trapping mode saw
 * it (MPRV, with MXR for execute-only pages): under paging, mepc is a virtual
 * address that means nothing to M-mode's own bare accesses.
 */
static uint64_t trapped_insn_length(uint64_t epc)
{
    const uint64_t mprv_mxr = (1UL << 17) | (1UL << 19);
    uint16_t low;
    CSR_SET(mstatus, mprv_mxr);
    __asm__ volatile("lhu %0, 0(%1)" : "=r"(low) : "r"(epc) : "memory");
    CSR_CLEAR(mstatus, mprv_mxr);
    return (low & 3) == 3 ? 4 : 2;
}

void trap_handler(struct trap_frame *frame)
{
    if (isa_trap_hook && isa_trap_hook(frame))
        return;
    uint64_t cause = CSR_READ(mcause);
    uint64_t epc = CSR_READ(mepc);
    if (is_exit_call(cause, epc))
        resume_m(frame->x[10]);
    if (trap_expected && !(cause >> 63)) {
        trap_expected = 0;
        last_trap.cause = cause;
        last_trap.epc = epc;
        last_trap.tval = CSR_READ(mtval);
        last_trap.status = CSR_READ(mstatus);
        last_trap.count++;
        CSR_WRITE(mepc, epc + trapped_insn_length(epc));
        return;
    }
    /* Assembly programs keep their check number in s11 (x27). */
    unsigned long test = isa_current ? isa_current : frame->x[27];
    kprintf("FAIL %s test=%lu (unexpected trap mcause=0x%lx mepc=0x%lx mtval=0x%lx)\n", isa_name,
            test, cause, epc, CSR_READ(mtval));
    finish_fail(1);
}

void s_trap_handler(struct trap_frame *frame)
{
    if (isa_s_trap_hook && isa_s_trap_hook(frame))
        return;
    uint64_t cause = CSR_READ(scause);
    uint64_t epc = CSR_READ(sepc);
    /* A delegated exit call from U-mode: pass it on to M-mode from here. */
    if (is_exit_call(cause, epc))
        exit_to_m(frame->x[10]);
    if (s_trap_expected && !(cause >> 63)) {
        s_trap_expected = 0;
        s_last_trap.cause = cause;
        s_last_trap.epc = epc;
        s_last_trap.tval = CSR_READ(stval);
        s_last_trap.status = CSR_READ(sstatus);
        s_last_trap.count++;
        CSR_WRITE(sepc, epc + insn_length(epc));
        return;
    }
    kprintf("FAIL %s test=%lu (unexpected S-mode trap scause=0x%lx sepc=0x%lx stval=0x%lx)\n",
            isa_name, isa_current, cause, epc, CSR_READ(stval));
    finish_fail(1);
}
