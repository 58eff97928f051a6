"""Sticky weighted bucketing, bit-for-bit the same as OpenFeature flagd's `fractional`.

flagd (high-precision integer form): hash the UTF-8 bytes of `seed + key` with
MurmurHash3_x86_32 (hash seed 0), read it as an unsigned 32-bit number `h`, and
take bucket `b = (h * total_weight) >> 32`, an integer in [0, total_weight). The
target is the first entry whose cumulative weight is greater than `b`.

Entries keep their order, so the last entry owns the top of the bucket range:
raising its weight (and lowering the ones before it) only grows its range
downwards, and no key it already held moves away.
"""

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

import mmh3


def cumulative(weights: Sequence[int]) -> tuple[int, ...]:
    """Upper bounds of each entry's bucket range: (90, 10) -> (90, 100)."""
    return tuple(accumulate(weights))


def bucket(seed: str, key: str, total_weight: int) -> int:
    """The bucket of `key` in [0, total_weight). mmh3 is given the UTF-8 bytes, never a str:
    it encodes a str itself without checking, and a lone surrogate crashes the process
    (SIGSEGV). Every source keeps such text out (sidecar.core.text); should one be missed,
    encode() raises and the request gets the counted fallback decision instead."""
    return (mmh3.hash((seed + key).encode(), 0, signed=False) * total_weight) >> 32


def entry_for(bounds: tuple[int, ...], bucket_value: int) -> int:
    """Index of the first entry whose cumulative weight is greater than the bucket."""
    return bisect_right(bounds, bucket_value)
