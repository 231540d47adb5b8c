"""asge-edge: backprop-free ASGE training for memory-starved hardware.

The public math API (exact semantics pinned by tests):
``partition_factor``, ``spatial_goodness``, ``rms_pool``.
"""

__version__ = "0.1.0"

from .asge import partition_factor, rms_pool, spatial_goodness  # noqa: E402

__all__ = ["partition_factor", "spatial_goodness", "rms_pool", "__version__"]
