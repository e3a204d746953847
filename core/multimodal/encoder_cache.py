"""The scheduler's accounts of the encoder cache: which images' encoder outputs the runner
holds, and how much encoder work one step may do.

An image's encoder output (one row per placeholder token) is computed once and kept under the
image's hash, so a request that chunks its prompt across the image, a second request with the
same image, or a recomputed (preempted) request reuses it. The runner holds the tensors; the
scheduler decides, as it does for KV blocks: each step's ``SchedulerOutput`` names the images
to encode and the hashes to drop.

Sizes are in placeholder tokens. An output is referenced by each request that has scheduled
tokens of its placeholder and not computed past it; unreferenced outputs stay cached (least
recently used dropped first) until room is needed.
"""

from __future__ import annotations

from collections import OrderedDict

from .inputs import ImageInput


class EncoderCacheManager:
    def __init__(self, capacity: int):
        self.capacity = capacity
        """Placeholder tokens the cache holds; an image larger than that fits only into an empty cache."""
        self._sizes: dict[str, int] = {}
        self._refs: dict[str, set[str]] = {}
        self._unreferenced: OrderedDict[str, None] = OrderedDict()
        self._freed: list[str] = []
        self.used = 0
        self.hits = 0
        """Images whose encoder output was cached when a scheduled chunk first needed it."""
        self.queries = 0
        """Images scheduled chunks needed (each count again after its request let go of it)."""

    def holds(self, image_hash: str) -> bool:
        return image_hash in self._sizes

    def can_add(self, size: int, extra: int = 0) -> bool:
        """Whether an output of ``size`` fits beside the referenced ones and ``extra`` tokens
        about to be added this step (evicting unreferenced outputs as needed)."""
        pinned = self.used - sum(self._sizes[h] for h in self._unreferenced) + extra
        return pinned + size <= self.capacity or pinned == 0

    def add(self, image: ImageInput, request_id: str) -> None:
        """Account for a new output (the runner computes it this step), referenced by the request."""
        while self._unreferenced and self.used + image.length > self.capacity:
            evicted, _ = self._unreferenced.popitem(last=False)
            self.used -= self._sizes.pop(evicted)
            del self._refs[evicted]
            self._freed.append(evicted)
        self._sizes[image.hash] = image.length
        self._refs[image.hash] = {request_id}
        self.used += image.length
        self.queries += 1

    def reference(self, image_hash: str, request_id: str) -> None:
        """The request uses a cached output (a hit, unless it referenced it already)."""
        refs = self._refs[image_hash]
        if request_id not in refs:
            self.queries += 1
            self.hits += 1
            refs.add(request_id)
        self._unreferenced.pop(image_hash, None)

    def release(self, image_hash: str, request_id: str) -> None:
        refs = self._refs.get(image_hash)
        if refs is None or request_id not in refs:
            return
        refs.discard(request_id)
        if not refs:
            self._unreferenced[image_hash] = None

    def release_computed(self, request_id: str, images: list[ImageInput], num_computed: int) -> None:
        """Drop the request's references to images whose placeholder it has computed past."""
        for image in images:
            if image.end <= num_computed:
                self.release(image.hash, request_id)

    def release_all(self, request_id: str, images: list[ImageInput]) -> None:
        for image in images:
            self.release(image.hash, request_id)

    def take_freed(self) -> list[str]:
        """Hashes evicted since the last call, for the runner to drop."""
        freed, self._freed = self._freed, []
        return freed
