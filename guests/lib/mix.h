/*
 * A 64-bit mixing function (the splitmix64 finaliser): cheap on RV64IM, and
 * it turns counters into well-spread values that are identical on every machine.
 */
#ifndef FERRY_MIX_H
#define FERRY_MIX_H

#include <stdint.h>

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

#endif
