"""Qwen2-VL's multimodal rotary positions (M-RoPE): three position ids per token.

Text tokens carry their index on all three axes. An image's placeholder tokens, its merged
patch grid (t, h, w), carry (time, row, column) offset by the position where the image starts,
and the text after it resumes one past the largest position used. So a prompt's positions run
shorter than its tokens: each later token sits ``delta`` (negative) from its index, and every
generated token at its index plus ``delta``, the same on all three axes.
"""

from __future__ import annotations

import numpy as np

from .inputs import ImageInput


def mrope_positions(num_tokens: int, images: list[ImageInput], merge: int) -> tuple[np.ndarray, int]:
    """([3, num_tokens] int64 positions of a prompt, delta of the tokens after it)."""
    positions = np.empty((3, num_tokens), dtype=np.int64)
    cursor, next_position = 0, 0
    for image in sorted(images, key=lambda i: i.offset):
        text = image.offset - cursor
        positions[:, cursor:image.offset] = next_position + np.arange(text)
        start = next_position + text
        t, h, w = image.grid_thw[0], image.grid_thw[1] // merge, image.grid_thw[2] // merge
        grid = np.indices((t, h, w)).reshape(3, -1)
        positions[:, image.offset:image.end] = start + grid
        cursor, next_position = image.end, start + int(grid.max()) + 1
    positions[:, cursor:] = next_position + np.arange(num_tokens - cursor)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta


def step_rope_positions(spans: list[tuple[int, int]], prompt_positions: list[np.ndarray | None],
                        deltas: list[int]) -> np.ndarray:
    """[3, T] rotary positions of a step whose request i computes tokens ``spans[i]`` = (start,
    count): its prompt's M-RoPE positions where it has them, its index plus ``deltas[i]`` past them."""
    parts = []
    for (start, count), prompt, delta in zip(spans, prompt_positions, deltas):
        index = np.arange(start, start + count)
        part = np.broadcast_to(index + delta, (3, count)).copy()
        if prompt is not None:
            inside = index < prompt.shape[1]
            part[:, inside] = prompt[:, index[inside]]
        parts.append(part)
    return np.concatenate(parts, axis=1)
