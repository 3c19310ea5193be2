/*
 * cpubench: a fixed integer workload for measuring a machine's guest speed.
 * Each round runs the kinds of code that dominate real guests: a table-driven
 * CRC32, sorting (quicksort, insertion sort), memory copies and a bytecode
 * interpreter's dispatch loop. The result checksum proves the work was done
 * right; the instruction count from minstret lets a host compute MIPS.
 *
 * `n=K` runs K rounds (default 140, about 25M instructions; one round is about 180k).
 */
#include "guest.h"
#include "mix.h"

#define BUF_BYTES 4096
#define SORT_LEN  256
#define ISORT_LEN 48

static uint32_t crc_table[256];
static uint8_t buf[BUF_BYTES];
static uint8_t copy[BUF_BYTES];
static uint32_t keys[SORT_LEN];

static void crc32_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const uint8_t *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static void fill_buffer(uint64_t round)
{
    uint64_t x = mix64(round + 1);
    uint64_t *w = (uint64_t *)buf;
    for (size_t i = 0; i < BUF_BYTES / 8; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        w[i] = x ^ (x >> 29);
    }
}

static void quicksort(uint32_t *a, long lo, long hi)
{
    while (lo < hi) {
        uint32_t pivot = a[lo + (hi - lo) / 2];
        long i = lo;
        long j = hi;
        while (i <= j) {
            while (a[i] < pivot)
                i++;
            while (a[j] > pivot)
                j--;
            if (i <= j) {
                uint32_t t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        /* Recurse into the smaller half so the stack stays shallow. */
        if (j - lo < hi - i) {
            quicksort(a, lo, j);
            lo = i;
        } else {
            quicksort(a, i, hi);
            hi = j;
        }
    }
}

static void insertion_sort(uint32_t *a, size_t n)
{
    for (size_t i = 1; i < n; i++) {
        uint32_t v = a[i];
        size_t j = i;
        while (j > 0 && a[j - 1] > v) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = v;
    }
}

static uint64_t sort_work(uint64_t round)
{
    uint64_t x = mix64(round ^ 0x50f7);
    for (size_t i = 0; i < SORT_LEN; i++) {
        x = x * 6364136223846793005ULL + 1;
        keys[i] = (uint32_t)(x >> 32);
    }
    insertion_sort(keys, ISORT_LEN);
    uint64_t h = keys[0] ^ ((uint64_t)keys[ISORT_LEN - 1] << 32);
    quicksort(keys, 0, SORT_LEN - 1);
    for (size_t i = 1; i < SORT_LEN; i++) {
        if (keys[i - 1] > keys[i]) {
            kprintf("cpubench: sort is wrong at %lu\n", (uint64_t)i);
            finish_fail(2);
        }
    }
    return h ^ keys[SORT_LEN / 2];
}

/* Word copy for the bulk, byte copy for an unaligned tail: both loops real guests run. */
static uint64_t copy_work(uint64_t round)
{
    const uint64_t *s = (const uint64_t *)buf;
    uint64_t *d = (uint64_t *)copy;
    for (size_t i = 0; i < BUF_BYTES / 8; i++)
        d[i] = s[i];
    size_t off = 1 + round % 7;
    volatile uint8_t *db = copy + off;
    for (size_t i = 0; i < 1024; i++)
        db[i] = buf[i + 2048];
    return crc32(copy, 256);
}

enum { OP_PUSH, OP_LOAD, OP_STORE, OP_ADD, OP_SUB, OP_MUL, OP_XOR, OP_SHR, OP_JNZ, OP_HALT };

/*
 * A stack machine running: acc = seed; for (i = 200; i; i--) acc = (acc ^ i*i) * 31 + (acc >> 7)
 * Locals: 0 = acc, 1 = i.
 */
static const uint8_t program[] = {
    OP_PUSH, 200, OP_STORE, 1,
    /* loop: */
    OP_LOAD, 0, OP_LOAD, 1, OP_LOAD, 1, OP_MUL, OP_XOR, OP_PUSH, 31, OP_MUL,
    OP_LOAD, 0, OP_PUSH, 7, OP_SHR, OP_ADD, OP_STORE, 0,
    OP_LOAD, 1, OP_PUSH, 1, OP_SUB, OP_STORE, 1,
    OP_LOAD, 1, OP_JNZ, 4,
    OP_HALT,
};

static uint64_t interpret(uint64_t seed)
{
    uint64_t stack[16];
    uint64_t locals[4] = {seed, 0, 0, 0};
    int sp = 0;
    size_t pc = 0;
    for (;;) {
        uint8_t op = program[pc++];
        switch (op) {
        case OP_PUSH: stack[sp++] = program[pc++]; break;
        case OP_LOAD: stack[sp++] = locals[program[pc++]]; break;
        case OP_STORE: locals[program[pc++]] = stack[--sp]; break;
        case OP_ADD: sp--; stack[sp - 1] += stack[sp]; break;
        case OP_SUB: sp--; stack[sp - 1] -= stack[sp]; break;
        case OP_MUL: sp--; stack[sp - 1] *= stack[sp]; break;
        case OP_XOR: sp--; stack[sp - 1] ^= stack[sp]; break;
        case OP_SHR: sp--; stack[sp - 1] >>= stack[sp]; break;
        case OP_JNZ: {
            uint8_t target = program[pc++];
            if (stack[--sp])
                pc = target;
            break;
        }
        default: return locals[0];
        }
    }
}

int main(unsigned long hartid, const void *fdt)
{
    (void)hartid;
    uint64_t rounds = arg_u64(fdt_bootargs(fdt), "n", 140);
    kprintf("cpubench: n=%lu\n", rounds);
    uint64_t start = CSR_READ(minstret);
    crc32_init();
    uint64_t result = 0;
    for (uint64_t r = 0; r < rounds; r++) {
        fill_buffer(r);
        result = mix64(result ^ crc32(buf, BUF_BYTES));
        result = mix64(result ^ sort_work(r));
        result = mix64(result ^ copy_work(r));
        result = mix64(result ^ interpret(result));
    }
    uint64_t instret = CSR_READ(minstret) - start;
    kprintf("cpubench: result=0x%016lx instret=%lu\n", result, instret);
    return 0;
}
