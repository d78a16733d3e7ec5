from .base import MHEHead
from .mhc import MHCHead, MHCOutput
from .mhp import MHPHead
from .mhs import MHSHead, MHSOutput

__all__ = ["MHEHead", "MHPHead", "MHCHead", "MHCOutput", "MHSHead", "MHSOutput"]
