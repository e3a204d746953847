"""Collectives run for real: one spawned process per rank, as tensor parallelism runs them.

Every rank runs every collective in the same order and only then judges the result, so a wrong
answer on one rank cannot leave the others waiting. Inputs are small integers in floating
point, so every correct reduction is exact whatever order a backend sums in.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from runtime.platform import Communicator, Platform, Registry

from .compare import dtype_name

TIMEOUT_S = 120


def world_sizes(platform: Platform) -> list[int]:
    """Two gloo processes share a CPU; devices give 2 ranks and, with more devices, all of them."""
    if platform.device_type == "cpu":
        return [2]
    count = platform.device_count()
    return sorted({2, count}) if count >= 2 else []


def _value(rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s input: small integers, different on every rank, the same wherever it is rebuilt."""
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(-8, 9, shape, generator=generator).to(dtype)


def _expect(what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    got = got.cpu()
    if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
        raise AssertionError(f"{what}: returned {tuple(got.shape)} {dtype_name(got.dtype)}, "
                             f"expected {tuple(expected.shape)} {dtype_name(expected.dtype)}")
    wrong = got != expected
    if wrong.any():
        i = tuple(int(x) for x in wrong.nonzero()[0])
        raise AssertionError(f"{what}: {int(wrong.sum())} of {wrong.numel()} values wrong, e.g. at {i} got "
                             f"{got[i].item():g}, expected {expected[i].item():g}")


def _all_reduce(comm, rank, world, device, dtype):
    got = comm.all_reduce(_value(rank, (4, 6), dtype).to(device))
    expected = sum(_value(r, (4, 6), torch.float32) for r in range(world)).to(dtype)
    _expect(f"all_reduce ({dtype_name(dtype)} [4, 6]) must return the sum over the {world} ranks", got, expected)


def _all_gather(comm, rank, world, device, dtype):
    for dim in (0, 1):
        got = comm.all_gather(_value(rank, (3, 5), dtype).to(device), dim=dim)
        expected = torch.cat([_value(r, (3, 5), dtype) for r in range(world)], dim=dim)
        _expect(f"all_gather ({dtype_name(dtype)} [3, 5], dim={dim}) must concatenate the ranks' tensors in rank order",
                got, expected)


def _reduce_scatter(comm, rank, world, device, dtype):
    for dim, shape in ((0, (4 * world, 6)), (1, (3, 2 * world))):
        got = comm.reduce_scatter(_value(rank, shape, dtype).to(device), dim=dim)
        summed = sum(_value(r, shape, torch.float32) for r in range(world)).to(dtype)
        _expect(f"reduce_scatter ({dtype_name(dtype)} {list(shape)}, dim={dim}) must return this rank's part of the sum",
                got, summed.chunk(world, dim=dim)[rank])


def _broadcast(comm, rank, world, device, dtype):
    for src in sorted({0, world - 1}):
        got = comm.broadcast(_value(rank, (2, 7), dtype).to(device), src=src)
        _expect(f"broadcast ({dtype_name(dtype)} [2, 7], src={src}) must return rank {src}'s tensor", got, _value(src, (2, 7), dtype))


def _send_recv(comm, rank, world, device, dtype):
    # Ranks 0 and 1 exchange both ways; the order (0 sends first) keeps blocking backends from deadlocking.
    for src, dst in ((0, 1), (1, 0)):
        if rank == src:
            comm.send(_value(src, (5, 3), dtype).to(device), dst=dst)
        elif rank == dst:
            got = comm.recv(torch.zeros(5, 3, dtype=dtype, device=device), src=src)
            _expect(f"recv ({dtype_name(dtype)} [5, 3]) on rank {dst} must return what rank {src} sent", got,
                    _value(src, (5, 3), dtype))


def _isend(comm, rank, world, device, dtype):
    # Ranks 0 and 1 each start a send to the other before either receives (as pipeline stages
    # do): an isend that waited for its receiver would leave both waiting.
    if rank > 1:
        return
    peer = 1 - rank
    handle = comm.isend(_value(rank, (6, 4), dtype).to(device), dst=peer)
    got = comm.recv(torch.zeros(6, 4, dtype=dtype, device=device), src=peer)
    handle.wait()
    _expect(f"recv ({dtype_name(dtype)} [6, 4]) on rank {rank} must return what rank {peer} started sending with isend",
            got, _value(peer, (6, 4), dtype))


def _barrier(comm, rank, world, device, dtype):
    # The last rank arrives late; everyone else must wait for it.
    delay = 1.0
    start = time.monotonic()
    if rank == world - 1:
        time.sleep(delay)
    comm.barrier()
    waited = time.monotonic() - start
    if waited < 0.8 * delay:
        raise AssertionError(f"barrier returned on rank {rank} after {waited:.2f} s, before rank {world - 1} arrived "
                             f"({delay} s late)")


def _rank(comm, rank, world, device, dtype):
    if (comm.rank, comm.world_size) != (rank, world):
        raise AssertionError(f"rank/world_size are {comm.rank}/{comm.world_size} in process {rank} of {world}")


COLLECTIVES: dict[str, Callable] = {
    "rank_and_world_size": _rank,
    "all_reduce": _all_reduce,
    "all_gather": _all_gather,
    "reduce_scatter": _reduce_scatter,
    "broadcast": _broadcast,
    "send_recv": _send_recv,
    "isend": _isend,
    "barrier": _barrier,
}
DTYPE_INDEPENDENT = {"rank_and_world_size", "barrier"}


def check_keys(platform: Platform) -> list[tuple[str, str, torch.dtype]]:
    """(report key, collective, dtype) for every check: collectives carrying data, in each platform dtype."""
    keys = []
    for name in COLLECTIVES:
        if name in DTYPE_INDEPENDENT:
            keys.append((name, name, torch.float32))
        else:
            keys += [(f"{name}-{dtype_name(d)}", name, d) for d in platform.supported_dtypes]
    return keys


@dataclass
class WorldResult:
    problems: dict[str, list[str]] = field(default_factory=dict)
    """Per check key, what any rank found wrong."""
    failures: list[str] = field(default_factory=list)
    """Ranks that crashed or hung: every check fails with these."""

    def check(self, key: str) -> list[str]:
        return self.failures + self.problems.get(key, [])


def _worker(rank: int, world: int, port: int, platform_name: str, out_dir: str) -> None:
    registry = Registry()
    platform = registry.select_platform(platform_name)
    communicator: type[Communicator] = registry.communicator(platform_name)
    device = platform.device(rank % platform.device_count())
    if device.type != "cpu":
        torch.get_device_module(device.type).set_device(device)
    dist.init_process_group(platform.dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=TIMEOUT_S // 2))
    comm = communicator()
    results: dict[str, str | None] = {}
    for key, name, dtype in check_keys(platform):
        try:
            COLLECTIVES[name](comm, rank, world, device, dtype)
            results[key] = None
        except AssertionError as exc:
            results[key] = str(exc)
        except Exception:
            results[key] = traceback.format_exc(limit=-3).strip()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(platform_name: str, world: int) -> WorldResult:
    """Run every collective on ``world`` ranks, one process each, and gather what they found.

    A rank that crashes or hangs past :data:`TIMEOUT_S` fails every check with the reason.
    """
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        processes = [context.Process(target=_worker, args=(rank, world, port, platform_name, out_dir), daemon=True)
                     for rank in range(world)]
        for p in processes:
            p.start()
        deadline = time.monotonic() + TIMEOUT_S
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
        result = WorldResult()
        for rank, p in enumerate(processes):
            if p.is_alive():
                p.kill()
                result.failures.append(f"rank {rank} still running after {TIMEOUT_S} s (a collective hangs)")
                continue
            path = Path(out_dir, f"rank{rank}.json")
            if not path.exists():
                result.failures.append(f"rank {rank} exited with status {p.exitcode} before finishing (its stderr says why)")
                continue
            for key, problem in json.loads(path.read_text()).items():
                if problem:
                    result.problems.setdefault(key, []).append(f"rank {rank}: {problem}")
        return result
