/*
 * `key=value` boot arguments, as the kernel command line spells them. Values
 * are integers, or decimals parsed to millionths: guests have no floating point.
 */
#include "guest.h"

/* Returns the value text of `key`, or NULL when the key is not given. */
static const char *arg_find(const char *args, const char *key)
{
    size_t klen = strlen(key);
    const char *p = args;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *word = p;
        while (*p && *p != ' ')
            p++;
        if ((size_t)(p - word) > klen && memcmp(word, key, klen) == 0 && word[klen] == '=')
            return word + klen + 1;
    }
    return NULL;
}

int arg_present(const char *args, const char *key)
{
    return arg_find(args, key) != NULL;
}

int arg_equals(const char *args, const char *key, const char *value)
{
    const char *v = arg_find(args, key);
    if (!v)
        return 0;
    size_t n = strlen(value);
    return memcmp(v, value, n) == 0 && (v[n] == ' ' || v[n] == 0);
}

uint64_t arg_u64(const char *args, const char *key, uint64_t dflt)
{
    const char *v = arg_find(args, key);
    if (!v || *v < '0' || *v > '9')
        return dflt;
    uint64_t n = 0;
    while (*v >= '0' && *v <= '9')
        n = n * 10 + (uint64_t)(*v++ - '0');
    return n;
}

uint64_t arg_fixed6(const char *args, const char *key, uint64_t dflt_millionths)
{
    const char *v = arg_find(args, key);
    if (!v || ((*v < '0' || *v > '9') && *v != '.'))
        return dflt_millionths;
    uint64_t whole = 0;
    while (*v >= '0' && *v <= '9')
        whole = whole * 10 + (uint64_t)(*v++ - '0');
    uint64_t frac = 0;
    uint64_t scale = 100000;
    if (*v == '.') {
        v++;
        for (; *v >= '0' && *v <= '9'; v++) {
            frac += (uint64_t)(*v - '0') * scale;
            scale /= 10;
        }
    }
    return whole * 1000000 + frac;
}
