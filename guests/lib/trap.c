/*
 * The default trap handler: a guest that did not expect a trap says where it
 * happened and fails, instead of looping silently.
 */
#include "guest.h"

__attribute__((weak)) void trap_handler(struct trap_frame *frame)
{
    (void)frame;
#ifdef SMODE
    kprintf("unexpected trap: scause=0x%lx sepc=0x%lx stval=0x%lx\n", CSR_READ(scause),
            CSR_READ(sepc), CSR_READ(stval));
#else
    kprintf("unexpected trap: mcause=0x%lx mepc=0x%lx mtval=0x%lx\n", CSR_READ(mcause),
            CSR_READ(mepc), CSR_READ(mtval));
#endif
    finish_fail(0x7f);
}
