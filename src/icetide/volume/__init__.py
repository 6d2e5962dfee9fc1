"""The implicit volume: multiresolution hash encoding (fused Triton or Numba kernels, or PyTorch), a small MLP,
and the field built on them."""

from .encoding import HASH_PRIMES, HashEncoding, Level, ReferenceHashEncoding, level_layout
from .field import ImplicitVolume
from .mlp import MLP

__all__ = [
    "HASH_PRIMES",
    "HashEncoding",
    "Level",
    "ReferenceHashEncoding",
    "level_layout",
    "ImplicitVolume",
    "MLP",
]
