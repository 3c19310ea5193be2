/*
 * The small runtime every M-mode guest links: console output, the finisher,
 * the devicetree's boot arguments and a default trap handler. No libc: the
 * images must stay tiny and contain nothing the emulator does not model.
 */
#ifndef FERRY_GUEST_H
#define FERRY_GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "machine.h"

/* Registers saved by the trap entry in start.S, in x-register order. */
struct trap_frame {
    uint64_t x[32]; /* x[0] holds nothing; x[2] is the interrupted sp */
};

void putc_raw(char c);
void puts_raw(const char *s);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kvprintf(const char *fmt, va_list ap);

/* How output leaves the guest: the UART by default, SBI calls in S-mode guests. */
extern void (*console_putc)(char c);

__attribute__((noreturn)) void finish_pass(void);
__attribute__((noreturn)) void finish_fail(unsigned code);

/* Called by the trap entry; guests override it (weak default reports and fails). */
void trap_handler(struct trap_frame *frame);
extern char trap_entry[];

/* The devicetree passed in a1 at boot. */
const char *fdt_bootargs(const void *fdt);
int fdt_memory(const void *fdt, uint64_t *base, uint64_t *size);

/* `key=value` lookups in a boot-argument string. */
uint64_t arg_u64(const char *args, const char *key, uint64_t dflt);
uint64_t arg_fixed6(const char *args, const char *key, uint64_t dflt_millionths);
int arg_present(const char *args, const char *key);
int arg_equals(const char *args, const char *key, const char *value);

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

extern char _end[];

#endif
