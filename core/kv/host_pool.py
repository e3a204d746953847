"""The host tier of the KV cache: blocks in host memory, for offloaded prefixes and swapped requests.

Each host block is free, a prefix-cache copy of an evicted device block (found by its hash;
evicted least recently used first), or held by a request preempted by swap (never evicted).
The pool only keeps accounts: the runner owns the host tensors, and the KV manager turns these
accounts into the copies each step makes (:class:`KVTransfers`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class KVTransfers:
    """One step's block copies between the device cache and the host tier, run before its forward
    pass: every ``to_host`` copy first (their device blocks may be handed out again this step),
    then every ``to_device`` one. Rows are ``(device block, host block)``."""

    to_host: list[tuple[int, int]] = field(default_factory=list)
    to_device: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.to_host or self.to_device)


class HostBlockPool:
    """Accounts of ``num_blocks`` host blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a host tier needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached: OrderedDict[bytes, int] = OrderedDict()
        """Prefix-cache copies, least recently used first."""
        self._locked: set[bytes] = set()
        """Copies read by this step's loads, which a later offload of the same step must not overwrite."""
        self._releasing: list[int] = []
        """Blocks swapped in this step: free again once the step's loads are issued."""
        self.num_held = 0
        """Blocks held by swapped-out requests."""

    @property
    def num_evictable(self) -> int:
        """Blocks a swap-out could take: free ones and unlocked prefix copies."""
        return len(self._free) + len(self._cached) - len(self._locked)

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def lock(self, block_hash: bytes) -> int:
        """The copy with this hash, kept (and made most recently used) until :meth:`end_step`."""
        self._cached.move_to_end(block_hash)
        self._locked.add(block_hash)
        return self._cached[block_hash]

    def store(self, block_hash: bytes) -> int | None:
        """A host block to copy a device block of this hash into, now cached under it; None when
        the copy is already here (made most recently used) or every block is held or locked."""
        if block_hash in self._cached:
            self._cached.move_to_end(block_hash)
            return None
        block = self._take()
        if block is not None:
            self._cached[block_hash] = block
        return block

    def hold(self, n: int) -> list[int] | None:
        """``n`` blocks for a swapped-out request (evicting prefix copies), or None, taking nothing."""
        if n > self.num_evictable:
            return None
        self.num_held += n
        return [self._take() for _ in range(n)]

    def release(self, blocks: list[int], after_step: bool) -> None:
        """Give back a swapped request's blocks; ``after_step`` when this step's loads still read them."""
        self.num_held -= len(blocks)
        (self._releasing if after_step else self._free).extend(blocks)

    def end_step(self) -> None:
        """The step's copies are issued: locks end, swapped-in blocks are free again."""
        self._locked.clear()
        self._free.extend(self._releasing)
        self._releasing.clear()

    def reset_prefix_cache(self) -> None:
        """Forget every prefix copy; a locked one's block is reused only after this step's loads."""
        for block_hash, block in self._cached.items():
            (self._releasing if block_hash in self._locked else self._free).append(block)
        self._cached.clear()

    def _take(self) -> int | None:
        if self._free:
            return self._free.pop()
        for block_hash, block in self._cached.items():
            if block_hash not in self._locked:
                del self._cached[block_hash]
                return block
        return None
