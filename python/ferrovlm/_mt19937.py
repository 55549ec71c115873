"""torch's CPU random permutation without torch, for the trainers' data order.

transformers' Trainer shuffles the training set with a ``RandomSampler``, which draws
``torch.randperm(n, generator=g)`` from a CPU ``torch.Generator`` that accelerate seeds with ``seed + epoch``.
That generator is a 32-bit Mersenne Twister (MT19937, seeded with the standard ``init_genrand``), and
``randperm`` on the CPU is a Fisher-Yates shuffle that swaps position ``i`` with ``i + next_u32() % (n - i)``.
``torch_randperm`` reproduces that sequence exactly, so a ferrovlm run sees its rows in the same order as the
transformers / TRL run it is compared against."""

from __future__ import annotations

_N = 624
_M = 397


class MT19937:
    """The 32-bit Mersenne Twister (Matsumoto & Nishimura 1998) as torch's CPU generator runs it."""

    def __init__(self, seed: int) -> None:
        mt = [0] * _N
        mt[0] = seed & 0xFFFFFFFF
        for i in range(1, _N):
            mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & 0xFFFFFFFF
        self.mt, self.i = mt, _N

    def next_u32(self) -> int:
        if self.i >= _N:
            mt = self.mt
            for k in range(_N):
                y = (mt[k] & 0x80000000) | (mt[(k + 1) % _N] & 0x7FFFFFFF)
                mt[k] = mt[(k + _M) % _N] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.i = 0
        y = self.mt[self.i]
        self.i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y & 0xFFFFFFFF


def torch_randperm(n: int, seed: int) -> list[int]:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()``."""
    gen = MT19937(seed)
    r = list(range(n))
    for i in range(n - 1):
        z = gen.next_u32() % (n - i)
        r[i], r[z + i] = r[z + i], r[i]
    return r
