"""``swap_blocks`` on a GPU: the conformance check against the reference (pinned host copies, every
cache layout), and the stream ordering the contract asks for: copies queued behind compute-stream
work that writes the blocks, and compute-stream work after the call seeing them."""

from __future__ import annotations

import pytest
import torch

from runtime.platform import AttentionBackend
from runtime.platform.reference import OPS, host_cache_shape
from runtime_conformance.kernel_checks import check_swap_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _swap_blocks():
    from runtime_triton.swap import swap_blocks

    return swap_blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_reference(dtype):
    from runtime_cuda.backend import CudaTritonAttentionBackend as TritonAttentionBackend

    layouts = [(lambda n, b=b: tuple(b.kv_cache_shape(n, 16, 8, 128)), b.kv_cache_block_dim)
               for b in (AttentionBackend, TritonAttentionBackend)]
    check_swap_blocks(_swap_blocks(), dtype, torch.device("cuda"), torch.Generator().manual_seed(0), layouts)


def test_copies_are_ordered_after_the_writes_before_them_and_before_the_reads_after_them():
    swap_blocks = _swap_blocks()
    shape = AttentionBackend.kv_cache_shape(64, 16, 8, 128)
    cache = torch.zeros(shape, device="cuda")
    host = torch.zeros(host_cache_shape(shape, 1, 8), pin_memory=True)
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # keep the compute stream busy so an unordered copy would read zeros
        big = (big @ big).tanh()
    cache[:, 3] = big[0, 0] + 1  # written by the compute stream, behind the matmuls
    swap_blocks([cache], [host], torch.tensor([[3, 5]]), 1, to_host=True)
    swap_blocks([cache], [host], torch.tensor([[9, 5]]), 1, to_host=False)
    total = cache[:, 9].sum()  # queued after the load on the compute stream
    expected = (big[0, 0] + 1) * cache[:, 9].numel()
    torch.testing.assert_close(total, expected)
    torch.cuda.synchronize()
    reference = torch.zeros(host_cache_shape(shape, 1, 8))
    OPS["swap_blocks"]([cache.cpu()], [reference], torch.tensor([[3, 5]]), 1, to_host=True)
    assert torch.equal(host, reference)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
def test_round_trip_through_the_host_matches_the_reference(pinned):
    """Pinned host blocks are copied by kernels over the mapped memory, pageable ones by DMA per
    block: both give the reference's host blocks and device blocks back."""
    swap_blocks = _swap_blocks()
    shape = AttentionBackend.kv_cache_shape(40, 16, 8, 128)
    cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    host = torch.zeros(host_cache_shape(shape, 1, 12), dtype=torch.bfloat16, pin_memory=pinned)
    out_pairs, in_pairs = torch.tensor([[3, 5], [17, 0], [39, 11]]), torch.tensor([[7, 11], [8, 5], [0, 0]])
    expected_cache, expected_host = cache.cpu(), torch.zeros(host.shape, dtype=host.dtype)
    OPS["swap_blocks"]([expected_cache], [expected_host], out_pairs, 1, to_host=True)
    OPS["swap_blocks"]([expected_cache], [expected_host], in_pairs, 1, to_host=False)
    swap_blocks([cache], [host], out_pairs, 1, to_host=True)
    swap_blocks([cache], [host], in_pairs, 1, to_host=False)
    torch.cuda.synchronize()
    assert torch.equal(host.cpu(), expected_host)
    assert torch.equal(cache.cpu(), expected_cache)
