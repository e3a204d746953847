"""How a pipeline stage meets its neighbours: the hidden state and the residual of every token
of a step, sent to the next stage's rank with the same tensor-parallel rank.

The send does not wait for the receiver (``Communicator.isend``): the first stage runs in the
engine core and must go on to launch the next micro-batch while later stages work; a waiting
send would hold it until the next stage is free. A stage receives with a blocking ``recv``:
it has nothing else to do before the previous stage's output arrives.
"""

from __future__ import annotations

from typing import Any

import torch

from ..platform import Communicator


class StageLink:
    """One rank's link to the previous and next pipeline stages (global ranks; None at the ends)."""

    def __init__(self, comm: Communicator, previous_rank: int | None, next_rank: int | None, hidden_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.comm = comm
        self.previous_rank, self.next_rank = previous_rank, next_rank
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device

    def receive(self, num_tokens: int) -> torch.Tensor:
        """The previous stage's [2, num_tokens, hidden] output (hidden state, residual) for this step."""
        buffer = torch.empty(2, num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        return self.comm.recv(buffer, src=self.previous_rank)

    def send(self, output: torch.Tensor) -> Any:
        """Start sending this stage's output on; the returned handle's ``wait()`` ends the send."""
        return self.comm.isend(output, dst=self.next_rank)
