"""Where the randomness of a DP release comes from: a cryptographic generator the server cannot replay.

Each release (a DP-SGD run, a noisy histogram, a round of local DP-SGD steps) draws its own key
of 32 bytes from the operating system (`os.urandom`) on the data owner's side, and expands it
with AES-256 in counter mode: a standard CSPRNG construction, so without the key its output can
be neither predicted nor regenerated. The key lives in memory only; it is never written, logged
or sent. Poisson sampling and Gaussian noise both come from it.

`privacy.reproducible_noise: true` keys the same generator from the public spec seed instead:
the same code and distribution, but anyone holding the spec can regenerate the noise and cancel
it, so such a release is NOT PRIVATE and is marked so everywhere. It exists for tests and
debugging only.

Gaussian values: Box-Muller over uniforms in float64 with 52 random bits (a double's mantissa).
Each noise value is the sum of four draws divided by two (the same standard deviation), Opacus's
secure-mode defence against the floating-point attacks on Gaussian samplers (Jin et al. 2022;
Holohan and Braghin 2021).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

NoiseOrigin = Literal["os_entropy", "reproducible"]
DRAWS_PER_VALUE = 4  # summed, then divided by sqrt(4) = 2
# A uniform double from 52 random bits with no integer-to-float conversion: the bits go into the
# mantissa of a double in [1, 2) (exponent of 1.0), and subtracting 1 - 2^-53 (exactly, by
# Sterbenz) gives (m + 1/2) 2^-52 in (0, 1): offset by half a step, so 0 never occurs.
_MANTISSA_MASK = (1 << 52) - 1
_ONE_BITS = 0x3FF0000000000000
_HALF_STEP_BELOW_ONE = 1.0 - 2.0**-53
# Gaussian values drawn per Box-Muller pass: its float64 temporaries (8 MiB each) then stay below
# glibc's mmap threshold and reuse freed heap pages; a single pass over DP-SGD's 4.9 M noise values
# (r=16 on every linear layer) made 117 MB of fresh mappings, faulted in page by page every step
_CHUNK = 1 << 20


class SecureRandom:
    """AES-256-CTR keystream as uniform, Bernoulli and Gaussian draws."""

    def __init__(self, key: bytes, origin: NoiseOrigin) -> None:
        if len(key) != 32:
            raise ValueError("the key is 32 bytes (AES-256)")
        self.origin = origin
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros, self._buffer = b"", bytearray()

    @classmethod
    def from_os_entropy(cls) -> SecureRandom:
        return cls(os.urandom(32), "os_entropy")

    @classmethod
    def from_public_seed(cls, *parts: object) -> SecureRandom:
        """Reproducible, hence NOT PRIVATE: the key is a hash of public values (the spec seed, ...)."""
        return cls(hashlib.sha256(":".join(map(str, parts)).encode()).digest(), "reproducible")

    @classmethod
    def for_release(cls, reproducible: bool, *public_parts: object) -> SecureRandom:
        return cls.from_public_seed(*public_parts) if reproducible else cls.from_os_entropy()

    @property
    def private(self) -> bool:
        return self.origin == "os_entropy"

    def _words(self, count: int) -> np.ndarray:
        """`count` uint64 words of keystream, in a buffer kept from one draw to the next (noise for
        millions of LoRA parameters is drawn every step, and a fresh buffer of that size faults
        its pages in each time). The words are valid until the next draw."""
        size = 8 * count
        if len(self._zeros) < size:
            self._zeros, self._buffer = bytes(size), bytearray(size + 15)  # update_into wants room for one more block
        self._stream.update_into(memoryview(self._zeros)[:size], self._buffer)
        return np.frombuffer(self._buffer, dtype=np.uint64, count=count)

    def uniform(self, count: int) -> np.ndarray:
        """Doubles in (0, 1), each (m + 1/2) 2^-52 for 52 random bits m."""
        values = ((self._words(count) & np.uint64(_MANTISSA_MASK)) | np.uint64(_ONE_BITS)).view(np.float64)
        values -= _HALF_STEP_BELOW_ONE
        return values

    def bernoulli(self, count: int, probability: float) -> np.ndarray:
        return self.uniform(count) < probability

    def coin(self, probability: float) -> bool:
        return bool(self.bernoulli(1, probability)[0])

    def _gaussian(self, count: int, std: float):
        """`count` values of N(0, std^2) as a float64 torch tensor: Box-Muller (two uniforms give
        two values), four draws per value summed and divided by two. torch is imported here, when
        noise is first drawn, so that `ksg` starts without it."""
        import torch

        # the same uniforms as `uniform`, made in place in the keystream buffer, by torch on every core
        words = torch.from_numpy(self._words(4 * count).view(np.int64))
        u = words.bitwise_and_(_MANTISSA_MASK).bitwise_or_(_ONE_BITS).view(torch.float64).sub_(_HALF_STEP_BELOW_ONE)
        # Box-Muller on 2 * count pairs gives the 4 * count draws: cosines and sines, each read as
        # two rows of `count`; in place, since this runs on every parameter at every step
        radius = u[: 2 * count].log_().mul_(-2.0).sqrt_()
        angle = u[2 * count :].mul_(2.0 * math.pi)
        cosines = torch.cos(angle).mul_(radius)
        sines = angle.sin_().mul_(radius)
        total = cosines.view(2, count).sum(0).add_(sines.view(2, count).sum(0))
        return total.mul_(std / math.sqrt(DRAWS_PER_VALUE))

    def normal(self, shape, std: float, dtype=None, device="cpu"):
        """N(0, std^2) of the given shape as a torch tensor, cast to `dtype` (default float32) last."""
        import torch

        dtype = dtype or torch.float32
        count = math.prod(shape)
        if std == 0 or count == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        values = torch.empty(count, dtype=dtype)
        for start in range(0, count, _CHUNK):
            values[start : start + _CHUNK] = self._gaussian(min(_CHUNK, count - start), std)  # cast on copy
        return values.view(shape).to(device=device)

    def normal_values(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        """The same Gaussian values as numpy float64 (noisy counts, aggregated updates)."""
        import torch

        return self.normal(shape, std, torch.float64).numpy()
