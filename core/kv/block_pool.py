"""The pool of KV-cache blocks: reference counts, an LRU free list, and the prefix-cache map."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

NULL_BLOCK_ID = 0
"""Never handed out: the runner pads block tables with it, so its contents are never read."""


class Block:
    """One KV-cache block: how many requests hold it, and the hash of its contents once full."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref_cnt={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    """All blocks of the cache.

    A block with ``ref_cnt == 0`` sits in the free list, ordered least recently freed first. A
    free block may still carry its hash, so a later request with the same prefix can take it
    back instead of recomputing it; it loses the hash only when it is handed out again. So the
    free list doubles as the prefix cache's LRU eviction order.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block {NULL_BLOCK_ID} is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Keyed by block id so a cache hit can take a block out of the middle in O(1).
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[bytes, Block] = {}
        self.on_evict: Callable[[Block], None] | None = None
        """Called with each cached block about to be handed out again, while it still holds its
        contents and hash (the KV manager copies it to the host tier)."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, cached-but-free ones included."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the usable (non-null) blocks held by some request."""
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    def allocate(self, n: int) -> list[Block]:
        """Hand out ``n`` blocks with one reference each, evicting the least recently freed first."""
        if n > len(self._free):
            raise ValueError(f"cannot allocate {n} blocks, only {len(self._free)} free")
        blocks = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None and self.on_evict is not None:
                self.on_evict(block)
            self.uncache(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference on each block (prefix-cache hits), reviving free ones."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference on each block; blocks reaching zero join the free list's tail in this order."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block!r}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def get_cached(self, block_hash: bytes) -> Block | None:
        """The block holding contents with this hash, if still cached."""
        return self._cached.get(block_hash)

    def cache(self, block: Block, block_hash: bytes) -> None:
        """Make ``block`` findable by ``block_hash``.

        When another block already holds the same contents (two requests computed the same
        prefix side by side), that one stays the cached copy and this one stays anonymous.
        """
        if block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def uncache(self, block: Block) -> None:
        """Forget the block's hash, so no later request can hit it."""
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> None:
        """Forget every hash. Blocks in use stay valid for the requests that hold them."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
