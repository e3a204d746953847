"""Several small host columns of different dtypes in one buffer (one host-to-device copy): each
column comes back from its typed view exactly, whatever the lengths and the order of dtypes."""

from __future__ import annotations

import random

import pytest
import torch

from runtime.worker.input_buffers import pack_columns, unpack_columns

DTYPES = (torch.float32, torch.bool, torch.int64, torch.int32, torch.float64, torch.int16)


def _values(rng: random.Random, dtype: torch.dtype, count: int) -> list:
    if dtype == torch.bool:
        return [rng.random() < 0.5 for _ in range(count)]
    if dtype.is_floating_point:
        return [rng.uniform(-1e3, 1e3) for _ in range(count)]
    return [rng.randrange(-2 ** 15, 2 ** 15) for _ in range(count)]


@pytest.mark.parametrize("seed", range(20))
def test_columns_come_back_exactly_from_one_buffer(seed):
    rng = random.Random(seed)
    columns = [(_values(rng, dtype, n), dtype)
               for dtype, n in ((rng.choice(DTYPES), rng.randrange(0, 13)) for _ in range(rng.randrange(1, 7)))]
    packed, places = pack_columns(columns)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    for got, (values, dtype) in zip(unpack_columns(packed, places), columns):
        assert got.dtype == dtype and torch.equal(got, torch.tensor(values, dtype=dtype).reshape(-1))
