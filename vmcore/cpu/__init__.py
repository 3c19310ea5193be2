"""The virtual CPU: an RV64IMAC hart with Sv39, and its mip interrupt bits."""

from vmcore.cpu.csr import MEIP, MSIP, MTIP, SEIP, SSIP, STIP
from vmcore.cpu.hart import Hart

__all__ = ["MEIP", "MSIP", "MTIP", "SEIP", "SSIP", "STIP", "Hart"]
