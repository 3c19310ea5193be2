/*
 * The memory map of QEMU's riscv64 `virt` board, which Ferry copies so that
 * one image runs unchanged on both machines.
 */
#ifndef FERRY_MACHINE_H
#define FERRY_MACHINE_H

#include <stdint.h>

#define UART_BASE      0x10000000UL
#define UART_THR       0       /* transmit holding register (write) */
#define UART_IER       1       /* interrupt enable register */
#define UART_IIR       2       /* interrupt identification (read) */
#define UART_LSR       5       /* line status register */
#define UART_LSR_THRE  0x20    /* transmit holding register empty */

#define FINISHER_BASE  0x100000UL
#define FINISHER_PASS  0x5555u
#define FINISHER_FAIL  0x3333u

#define CLINT_BASE     0x2000000UL
#define CLINT_MSIP     (CLINT_BASE + 0x0)
#define CLINT_MTIMECMP (CLINT_BASE + 0x4000)
#define CLINT_MTIME    (CLINT_BASE + 0xBFF8)
#define MTIME_HZ       10000000UL

#define PLIC_BASE      0xC000000UL
#define PLIC_UART_IRQ  10

#define RAM_BASE       0x80000000UL

#define MMIO8(addr)  (*(volatile uint8_t *)(uintptr_t)(addr))
#define MMIO32(addr) (*(volatile uint32_t *)(uintptr_t)(addr))
#define MMIO64(addr) (*(volatile uint64_t *)(uintptr_t)(addr))

/* CSR accesses are ordered against memory accesses: they change how memory behaves (satp, MPRV). */
#define CSR_READ(csr) \
    ({ uint64_t v_; __asm__ volatile("csrr %0, " #csr : "=r"(v_)::"memory"); v_; })
#define CSR_WRITE(csr, val) \
    __asm__ volatile("csrw " #csr ", %0" ::"rK"((uint64_t)(val)) : "memory")
#define CSR_SET(csr, val) \
    __asm__ volatile("csrs " #csr ", %0" ::"rK"((uint64_t)(val)) : "memory")
#define CSR_CLEAR(csr, val) \
    __asm__ volatile("csrc " #csr ", %0" ::"rK"((uint64_t)(val)) : "memory")

#define MSTATUS_MIE  (1UL << 3)
#define MIE_MSIE     (1UL << 3)
#define MIE_MTIE     (1UL << 7)
#define MIE_MEIE     (1UL << 11)

static inline uint64_t mtime_now(void) { return MMIO64(CLINT_MTIME); }

#endif
