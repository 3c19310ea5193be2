"""What dirty logging costs: guest MIPS with and without it, and the price of a fetch.

* ``cpubench`` (CPU-bound, few stores) and ``dirtier`` (store-heavy: every page it touches
  is a first store after each fetch) run with logging off, then on with a
  ``fetch_and_reset()`` every 100 ms of wall time, as a migration sender would.
* ``fetch_and_reset()`` over 256 MiB of RAM with 1% and 50% of the pages dirty.

Guest MIPS are per CPU second; medians of several runs; prints figures only, never passes
or fails on speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmcore.memory import GuestRAM  # noqa: E402
from vmcore.vm import VM, VMConfig, VMState  # noqa: E402

GUESTS = ROOT / "guests" / "build"
FETCH_EVERY_S = 0.1


def guest_mips(config: VMConfig, logging: bool, instructions: int) -> float:
    """Retired instructions per CPU second of this process over ``instructions`` (or until
    power-off). CPU time, not wall time, so other load on the machine does not pass for a
    logging cost; the fetches' own cost is inside it."""
    vm = VM(config)
    vm.start()
    if logging:
        vm.dirty_log.enable()
    retired = 0
    start = time.process_time()
    last_fetch = time.perf_counter()
    while retired < instructions and vm.state is VMState.RUNNING:
        retired += vm.run_slice(50_000).retired
        now = time.perf_counter()
        if logging and now - last_fetch >= FETCH_EVERY_S:
            vm.dirty_log.fetch_and_reset()
            last_fetch = now
    return retired / (time.process_time() - start) / 1e6


def fetch_ms(ram_mib: int, fraction: float, repeats: int) -> float:
    """Median wall time of one ``fetch_and_reset()`` with ``fraction`` of pages dirty."""
    ram = GuestRAM(ram_mib << 20)
    log = ram.dirty_log
    log.enable()
    rng = np.random.default_rng(1)
    count = int(ram.page_count * fraction)
    times = []
    for _ in range(repeats):
        pages = rng.choice(ram.page_count, size=count, replace=False)
        for p in pages.tolist():
            log.mark(p)
        t = time.perf_counter()
        got = log.fetch_and_reset()
        times.append((time.perf_counter() - t) * 1e3)
        assert len(got) == count
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--instructions", type=int, default=10_000_000)
    args = parser.parse_args()

    workloads = {
        "cpubench": VMConfig(kernel=str(GUESTS / "cpubench.elf"), memory=64 << 20),
        "dirtier": VMConfig(
            kernel=str(GUESTS / "dirtier.elf"), memory=64 << 20, append="wss=4 rate=max"
        ),
    }
    print(f"{'workload':<10} {'MIPS off':>9} {'MIPS on':>9} {'slowdown':>9}")
    for name, config in workloads.items():
        off, on = [], []
        for _ in range(args.repeats):  # interleave so machine noise hits both alike
            off.append(guest_mips(config, False, args.instructions))
            on.append(guest_mips(config, True, args.instructions))
        m_off, m_on = statistics.median(off), statistics.median(on)
        print(f"{name:<10} {m_off:9.2f} {m_on:9.2f} {100 * (1 - m_on / m_off):8.1f}%")
    print()
    print(f"{'fetch_and_reset, 256 MiB':<28} {'median ms':>10}")
    for fraction in (0.01, 0.5):
        label = f"{fraction:.0%} of pages dirty"
        print(f"{label:<28} {fetch_ms(256, fraction, args.repeats):10.2f}")


if __name__ == "__main__":
    main()
