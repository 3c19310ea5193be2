/* The smallest guest: proves a machine can load an image, print and power off. */
#include "guest.h"

int main(unsigned long hartid, const void *fdt)
{
    (void)hartid;
    (void)fdt;
    puts_raw("Hello from a Ferry guest!\n");
    return 0;
}
