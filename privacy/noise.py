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

Gaussian values: Box-Muller over 53-bit uniforms in float64. Each noise value is the sum of four
draws divided by two (the same standard deviation), Opacus's secure-mode defence against the
floating-point attacks on Gaussian samplers (Jin et al. 2022; Holohan and Braghin 2021).
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
_MANTISSA = np.uint64(11)  # a uint64 shifted right by 11 leaves 53 random bits: a double's precision


class SecureRandom:
    """AES-256-CTR keystream as uniform, Bernoulli and Gaussian draws."""

    def __init__(self, key: bytes, origin: NoiseOrigin) -> None:
        if len(key) != 32:
            raise ValueError("the key is 32 bytes (AES-256)")
        self.origin = origin
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

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
        """`count` uint64 words of keystream (written into one buffer: noise for millions of LoRA
        parameters is drawn every step)."""
        out = bytearray(8 * count + 15)  # update_into wants room for one more block
        self._stream.update_into(bytes(8 * count), out)
        return np.frombuffer(out, dtype=np.uint64, count=count)

    def uniform(self, count: int) -> np.ndarray:
        """Doubles in (0, 1): 53 random bits, offset by half a step so that 0 never occurs."""
        values = (self._words(count) >> _MANTISSA).astype(np.float64)
        values += 0.5
        values *= 2.0**-53
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

        # the same uniforms as `uniform`, converted by torch on every core ((word >> 11) keeps 53
        # bits; the mask undoes the sign extension of the int64 view)
        words = torch.from_numpy(self._words(4 * count).view(np.int64))
        u = (words >> 11).bitwise_and_((1 << 53) - 1).to(torch.float64).add_(0.5).mul_(2.0**-53)
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
        return self._gaussian(count, std).view(shape).to(dtype=dtype, device=device)

    def normal_values(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        """The same Gaussian values as numpy float64 (noisy counts, aggregated updates)."""
        count = math.prod(shape)
        if std == 0 or count == 0:
            return np.zeros(shape)
        return self._gaussian(count, std).numpy().reshape(shape)
