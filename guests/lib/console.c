/*
 * Console output and a small printf. Output is byte-for-byte the same on
 * every machine, so tests can compare a guest's console across QEMU and Ferry.
 */
#include "guest.h"

static void uart_putc(char c)
{
    while (!(MMIO8(UART_BASE + UART_LSR) & UART_LSR_THRE)) {
    }
    MMIO8(UART_BASE + UART_THR) = (uint8_t)c;
}

void (*console_putc)(char c) = uart_putc;

/* Lines end in CRLF, as firmware consoles do, so raw terminals show them right. */
void putc_raw(char c)
{
    if (c == '\n')
        console_putc('\r');
    console_putc(c);
}

void puts_raw(const char *s)
{
    while (*s)
        putc_raw(*s++);
}

static void put_number(uint64_t v, unsigned base, int negative, int width, char pad)
{
    char buf[24];
    int n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (negative)
        buf[n++] = '-';
    for (int i = n; i < width; i++)
        putc_raw(pad);
    while (n)
        putc_raw(buf[--n]);
}

/* Supports what the guests use: %s %c %d %u %x %p, flag 0, a width, and l/ll. */
void kvprintf(const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            putc_raw(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0;
        int is_long = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            puts_raw(s ? s : "(null)");
            break;
        }
        case 'c':
            putc_raw((char)va_arg(ap, int));
            break;
        case 'd': {
            int64_t v = is_long ? va_arg(ap, int64_t) : va_arg(ap, int);
            put_number(v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0, width, pad);
            break;
        }
        case 'u':
            put_number(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, 0, width, pad);
            break;
        case 'x':
            put_number(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, 0, width, pad);
            break;
        case 'p':
            puts_raw("0x");
            put_number((uint64_t)(uintptr_t)va_arg(ap, void *), 16, 0, 16, '0');
            break;
        case '%':
            putc_raw('%');
            break;
        default:
            putc_raw('%');
            putc_raw(*fmt);
            break;
        }
    }
}

void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(fmt, ap);
    va_end(ap);
}
