"""The KV-cache manager: which blocks each request holds, and the prefix cache over them."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from ..sched.request import Request
from .block_pool import Block, BlockPool
from .host_pool import HostBlockPool, KVTransfers


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int], lora_id: int, extra: bytes = b"") -> bytes:
    """The prefix-cache key of one full block: it depends on every token before it (through
    ``parent_hash``), its own tokens, the LoRA adapter that produced its KV, and ``extra``: the
    hashes of the images whose placeholder tokens it holds (equal placeholders, other images).

    SHA-256 rather than Python's ``hash``: integer hashing is predictable, so a tenant could craft
    a prompt whose key collides with another's and read KV computed from someone else's prompt.
    """
    h = hashlib.sha256(parent_hash or b"")
    h.update(lora_id.to_bytes(8, "little", signed=True))
    h.update(array("q", token_ids).tobytes())
    h.update(extra)
    return h.digest()


class KVCacheManager:
    """Owner of all block state: allocation, freeing and prefix caching, per request.

    A request's blocks cover its tokens in order: token ``i`` lives in block ``i // block_size``
    of its list. Full blocks whose tokens are known are registered under a hash chain, so a later
    request sharing the prefix (same tokens, same LoRA adapter) reuses them instead of recomputing.

    With ``num_host_blocks``, a host tier (:class:`HostBlockPool`) backs the device: a cached
    block evicted from the device is copied there first, and a later prefix hit on it is copied
    back into a fresh device block (KV offload); a request preempted by swap keeps its KV there
    (:meth:`swap_out`, :meth:`swap_in`). The copies a step needs are collected here and handed
    out by :meth:`take_transfers`, for the runner to make before the step's forward pass.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.host = HostBlockPool(num_host_blocks) if num_host_blocks else None
        if self.host is not None and enable_prefix_caching:
            self.pool.on_evict = self._offload
        self._transfers = KVTransfers()
        self._swapped: dict[str, list[int]] = {}
        """Host blocks of each request preempted by swap, covering its computed tokens in order."""
        self._host_hits: dict[str, list[bytes]] = {}
        """The host-tier part of the latest get_computed_blocks answer, for the allocate_slots after it."""
        self._blocks: dict[str, list[Block]] = {}
        # The same blocks as ids, kept alongside so handing a block table out is one list copy.
        self._block_ids: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}
        """Hash chain of the request's full blocks, computed as far as needed so far."""
        self._num_cached: dict[str, int] = {}
        """How many of the request's leading blocks were already offered to the prefix cache."""
        self.prefix_cache_queries = 0
        """Tokens looked up in the prefix cache."""
        self.prefix_cache_hits = 0
        """Tokens found there."""
        self.cpu_prefix_cache_queries = 0
        """Tokens looked up in the host tier: those the device's prefix cache missed."""
        self.cpu_prefix_cache_hits = 0
        """Tokens found there."""

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (0.0 to 1.0)."""
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy); empty when it holds no blocks."""
        return list(self._block_ids.get(request_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached blocks matching the start of the request's tokens.

        Returns the ids of the device's hits and the number of tokens all hits hold: with a host
        tier, the run goes on there where the device's ends, and :meth:`allocate_slots` loads
        those blocks back. At least one token is always left to compute, because its logits
        choose the next token. Nothing is returned when prefix caching is off or the request
        wants prompt logprobs (those need every prompt position's logits), nor for an embedding
        pooled from every position's hidden state. Takes no references: pass the result to
        :meth:`allocate_slots` at once.
        """
        if (not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None
                or (request.pooling is not None and request.pooling.reads_every_position)):
            return [], 0
        num_full = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for i in range(num_full):
            block = self.pool.get_cached(self._block_hash(request, i))
            if block is None:
                break
            hits.append(block.block_id)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        if self.host is None:
            return hits, num_hit_tokens
        host_hits = []
        for i in range(len(hits), num_full):
            block_hash = self._block_hash(request, i)
            if self.host.lookup(block_hash) is None:
                break
            host_hits.append(block_hash)
        self._host_hits = {request.request_id: host_hits}
        self.cpu_prefix_cache_queries += request.num_tokens - num_hit_tokens
        self.cpu_prefix_cache_hits += len(host_hits) * self.block_size
        return hits, num_hit_tokens + len(host_hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[int] = (),
        num_new_computed_tokens: int = 0,
    ) -> list[int] | None:
        """Make the request's blocks cover ``num_computed_tokens + num_new_computed_tokens +
        num_new_tokens`` tokens, first taking the prefix-cache hits ``new_computed_blocks``
        (from :meth:`get_computed_blocks`, holding ``num_new_computed_tokens`` tokens, host-tier
        hits included: each gets a new block and a copy back from the host).

        Returns the request's whole block table, or ``None``, changing nothing, when too few
        blocks are free. Blocks that become full with known tokens are registered in the prefix
        cache right away: a request hitting them in the same step reads KV that the forward pass
        writes before any attention reads it.
        """
        request_id = request.request_id
        num_covered = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        held_ids = self._block_ids.get(request_id)
        if not num_new_computed_tokens and held_ids is not None and num_covered <= len(held_ids) * self.block_size:
            # A decode step inside its last block, 15 steps in 16: nothing to allocate.
            num_full = min(num_covered, request.num_tokens) // self.block_size
            if self.enable_prefix_caching and num_full > self._num_cached.get(request_id, 0):
                self._cache_full_blocks(request, num_full)
            return list(held_ids)
        held = self._blocks.get(request_id, [])
        hits = [self.pool.blocks[i] for i in new_computed_blocks]
        num_loaded = num_new_computed_tokens // self.block_size - len(hits)
        num_needed = max(0, -(-num_covered // self.block_size) - len(held) - len(hits))
        # A hit on a free block takes it off the free list, so it cannot serve as a new block too.
        num_revived = sum(1 for block in hits if block.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_revived:
            return None

        # Locked before allocating: the evictions that allocation offloads must not overwrite them.
        sources = [self.host.lock(h) for h in self._host_hits.pop(request_id)[:num_loaded]] if num_loaded else []
        self.pool.touch(hits)
        new_blocks = self.pool.allocate(num_needed)
        self._transfers.to_device += zip((block.block_id for block in new_blocks), sources)
        blocks = self._blocks.setdefault(request_id, [])
        blocks += hits
        blocks += new_blocks
        ids = self._block_ids.setdefault(request_id, [])
        ids += new_computed_blocks
        ids += (block.block_id for block in new_blocks)
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, min(num_covered, request.num_tokens) // self.block_size)
        return list(ids)

    def free(self, request: Request) -> None:
        """Release the request's blocks. Safe to call again, or for a request holding none.
        Call it before resetting the request's ``num_computed_tokens`` (preemption).

        Blocks go back to the free list in reverse, so under memory pressure a sequence's tail
        is evicted before its prefix, which other requests are more likely to share.
        """
        request_id = request.request_id
        if request_id in self._swapped:
            self.host.release(self._swapped.pop(request_id), after_step=False)
        blocks = self._blocks.pop(request_id, [])
        self._block_ids.pop(request_id, None)
        self._hashes.pop(request_id, None)
        num_cached = self._num_cached.pop(request_id, 0)
        # Blocks registered at allocation but past num_computed_tokens belong to a step that was
        # never committed (a victim preempted after it was scheduled in the same step, whose work
        # is withdrawn; or an abort between schedule and update): their KV may never be written.
        for block in blocks[request.num_computed_tokens // self.block_size : num_cached]:
            self.pool.uncache(block)
        self.pool.free(reversed(blocks))

    def is_swapped(self, request: Request) -> bool:
        """Whether the request was preempted by swap and its KV waits in the host tier."""
        return request.request_id in self._swapped

    def swap_out(self, request: Request) -> bool:
        """Preempt by swap: copy the blocks of the request's computed tokens to the host tier and
        release its device blocks; its ``num_computed_tokens`` stays. False, changing nothing,
        without a host tier, with nothing computed, or when the host tier has too little room
        (swapped requests' blocks are never evicted): recompute it instead."""
        if self.host is None or request.num_computed_tokens == 0:
            return False
        num_blocks = -(-request.num_computed_tokens // self.block_size)
        host_ids = self.host.hold(num_blocks)
        if host_ids is None:
            return False
        device_ids = self._block_ids[request.request_id][:num_blocks]
        self._transfers.to_host += zip(device_ids, host_ids)
        self.free(request)
        self._swapped[request.request_id] = host_ids
        return True

    def swap_in(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Resume a swapped request: new device blocks for its computed tokens (copied back from
        the host tier) and ``num_new_tokens`` more. Returns its block table, or None, changing
        nothing, when too few blocks are free."""
        num_covered = request.num_computed_tokens + num_new_tokens
        num_needed = -(-num_covered // self.block_size)
        if num_needed > self.pool.num_free_blocks:
            return None
        host_ids = self._swapped.pop(request.request_id)
        blocks = self.pool.allocate(num_needed)
        ids = [block.block_id for block in blocks]
        self._transfers.to_device += zip(ids, host_ids)
        self.host.release(host_ids, after_step=True)
        self._blocks[request.request_id] = blocks
        self._block_ids[request.request_id] = ids
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, min(num_covered, request.num_tokens) // self.block_size)
        return list(ids)

    def take_transfers(self) -> KVTransfers:
        """The block copies collected since the last call, for the step being scheduled."""
        transfers, self._transfers = self._transfers, KVTransfers()
        if self.host is not None:
            self.host.end_step()
        return transfers

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after weights change); held blocks stay valid."""
        self.pool.reset_prefix_cache()
        if self.host is not None:
            self.host.reset_prefix_cache()

    def _offload(self, block: Block) -> None:
        """Copy a cached block the device is about to reuse into the host tier, where room is."""
        host_id = self.host.store(block.block_hash)
        if host_id is not None:
            self._transfers.to_host.append((block.block_id, host_id))

    def _block_hash(self, request: Request, index: int) -> bytes:
        """Hash of the request's full block ``index``, extending its cached chain as needed."""
        chain = self._hashes.setdefault(request.request_id, [])
        size = self.block_size
        while len(chain) <= index:
            start = len(chain) * size
            parent = chain[-1] if chain else None
            images = b"".join(bytes.fromhex(image.hash) for image in request.mm_inputs
                              if image.offset < start + size and image.end > start)
            chain.append(hash_block_tokens(parent, request.all_token_ids[start : start + size], request.lora_id, images))
        return chain[index]

    def _cache_full_blocks(self, request: Request, num_full_blocks: int) -> None:
        request_id = request.request_id
        start = self._num_cached.get(request_id, 0)
        if num_full_blocks <= start:
            return
        blocks = self._blocks[request_id]
        for i in range(start, num_full_blocks):
            self.pool.cache(blocks[i], self._block_hash(request, i))
        self._num_cached[request_id] = max(start, num_full_blocks)
