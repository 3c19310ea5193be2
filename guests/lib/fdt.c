/*
 * Just enough of a flattened-devicetree reader for guests: the boot arguments
 * in /chosen and the RAM range in /memory. The board hands us the blob in a1;
 * we read it in place and never trust it further than its own header says.
 */
#include "guest.h"

#define FDT_MAGIC      0xd00dfeedu
#define FDT_BEGIN_NODE 1
#define FDT_END_NODE   2
#define FDT_PROP       3
#define FDT_NOP        4
#define FDT_END        9

static uint32_t be32(const void *p)
{
    const uint8_t *b = p;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}

static int name_is(const char *name, const char *want)
{
    /* "memory@80000000" matches "memory": unit addresses vary by board. */
    while (*want && *name == *want) {
        name++;
        want++;
    }
    return *want == 0 && (*name == 0 || *name == '@');
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

/*
 * Finds property `prop` of a direct child of the root named `node`; returns
 * its value and length, or NULL. Children of the root are all we ever need.
 */
static const void *fdt_root_child_prop(const void *fdt, const char *node, const char *prop,
                                        uint32_t *len_out)
{
    if (!fdt || be32(fdt) != FDT_MAGIC)
        return NULL;
    const uint8_t *base = fdt;
    uint32_t total = be32(base + 4);
    uint32_t off_struct = be32(base + 8);
    uint32_t off_strings = be32(base + 12);
    uint32_t size_struct = be32(base + 36);
    if (off_struct >= total || off_strings >= total || size_struct > total - off_struct)
        return NULL;
    const uint8_t *p = base + off_struct;
    const uint8_t *end = p + size_struct;
    int depth = 0;
    int in_node = 0;
    while (p + 4 <= end) {
        uint32_t token = be32(p);
        p += 4;
        if (token == FDT_BEGIN_NODE) {
            const char *name = (const char *)p;
            depth++;
            in_node = depth == 2 && name_is(name, node);
            p += (strlen(name) + 1 + 3) & ~3UL;
        } else if (token == FDT_END_NODE) {
            if (in_node && depth == 2)
                in_node = 0;
            depth--;
        } else if (token == FDT_PROP) {
            uint32_t len = be32(p);
            uint32_t nameoff = be32(p + 4);
            p += 8;
            if (in_node && depth == 2 && off_strings + nameoff < total &&
                streq((const char *)base + off_strings + nameoff, prop)) {
                *len_out = len;
                return p;
            }
            p += (len + 3) & ~3UL;
        } else if (token == FDT_NOP) {
            continue;
        } else {
            break;
        }
    }
    return NULL;
}

const char *fdt_bootargs(const void *fdt)
{
    uint32_t len = 0;
    const char *args = fdt_root_child_prop(fdt, "chosen", "bootargs", &len);
    /* A property that is not a terminated string is as good as absent. */
    if (!args || len == 0 || args[len - 1] != 0)
        return "";
    return args;
}

/* Assumes the root's #address-cells and #size-cells are 2, as on `virt`. */
int fdt_memory(const void *fdt, uint64_t *base, uint64_t *size)
{
    uint32_t len = 0;
    const uint8_t *reg = fdt_root_child_prop(fdt, "memory", "reg", &len);
    if (!reg || len < 16)
        return -1;
    *base = ((uint64_t)be32(reg) << 32) | be32(reg + 4);
    *size = ((uint64_t)be32(reg + 8) << 32) | be32(reg + 12);
    return 0;
}
