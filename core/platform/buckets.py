"""Static-shape buckets: the few step sizes a graph-compiling platform (TPU, Gaudi) compiles for.

A compiler that traces a whole step (XLA, HPU graphs) compiles once per distinct set of input
shapes. Padding every step up to the next of a few sizes bounds the compilations: powers of two
from ``smallest`` up, and the largest size itself, so the padding never more than doubles a
step. ``PlatformConfig.static_shape_buckets`` holds the token buckets; sequence counts use the
same ladder from 1 up to ``--max-num-seqs`` (:func:`sequence_buckets`).
"""

from __future__ import annotations

import bisect

SMALLEST_TOKEN_BUCKET = 16


def ladder(largest: int, smallest: int = 1) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``largest``, then ``largest``."""
    sizes, size = [], smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


def token_buckets(max_num_batched_tokens: int) -> tuple[int, ...]:
    return ladder(max_num_batched_tokens, min(SMALLEST_TOKEN_BUCKET, max_num_batched_tokens))


def sequence_buckets(max_num_seqs: int) -> tuple[int, ...]:
    return ladder(max_num_seqs, 1)


def bucket_for(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``size``; a size past the largest is a scheduler bug."""
    index = bisect.bisect_left(buckets, size)
    if index == len(buckets):
        raise ValueError(f"a step of {size} exceeds the largest static-shape bucket {buckets[-1]}")
    return buckets[index]
