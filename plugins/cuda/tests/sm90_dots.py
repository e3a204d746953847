"""The plugin's Triton kernels compiled for sm_90 on any machine (Triton's compiler and ptxas, no
GPU), as their launchers would launch them: each launcher runs on CPU tensors with Triton's
``JITFunction.run`` replaced by a recorder, and every recorded launch is compiled with the
signature and specialization its arguments give. For each, whether a matrix instruction takes its
first operand from registers while a wait leaves it pending (Triton lets it run on past the next
loop iteration). Triton 3.6 and 3.7 keep only the accumulator and the shared-memory operand alive
across such a wait, so the next K tile's values may be written into registers a matrix
instruction still reads: on an H100, 4 of 24 tile plans of that form summed wrongly
(docs/quantization.md, twenty-second session). A Gluon kernel may take the form on purpose, its
wait naming the registers to keep: for those the SASS itself is walked for writes to a register
a pending matrix instruction reads (``pending_operand_writes``), and for every Gluon kernel the
waits that serialize its matrix instructions are counted.

Usage: python3 sm90_dots.py            (a JSON list: label, kernel, register_operand, pending_waits,
                                        for Gluon kernels serialized, with a register operand
                                        pending_operand_writes; the first entries are the controls)
       python3 sm90_dots.py --cache ~/.triton/cache   (after a GPU run: every kernel compiled there
                                        with the form, by name)
Run it without TRITON_INTERPRET."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
from triton.runtime.jit import JITFunction

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


@contextlib.contextmanager
def recorded_launches():
    """The launches made inside the block, as (kernel, args, kwargs), none of them run."""
    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def compile_for_sm90(kernel: JITFunction, args: tuple, kwargs: dict):
    """What the launcher would compile: tensors as pointers (16-byte aligned ones so marked), integers
    that are multiples of 16 so marked unless the kernel opts out, constexprs and None as constants."""
    kwargs = dict(kwargs)
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    # A Gluon kernel may take num_warps as a parameter too: the launch option's value.
    values = list(args) + [kwargs.get(p.name, options.get(p.name, p.default)) for p in kernel.params[len(args):]]
    signature, constants, attrs = {}, {}, {}
    for i, (param, value) in enumerate(zip(kernel.params, values)):
        aligned = False
        if param.is_constexpr or value is None:
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name], aligned = "*" + TYPES[value.dtype], value.data_ptr() % 16 == 0
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            aligned = value != 0 and value % 16 == 0 and not param.do_not_specialize
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {param.name} of type {type(value).__name__}")
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = GluonASTSource if kernel.is_gluon() else ASTSource
    return triton.compile(source(fn=kernel, signature=signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def dots(ttgir: str) -> dict:
    """Whether a matrix instruction takes its first operand from registers, and the pending counts
    of the waits, in one kernel's TTGIR."""
    # The first operand's type is the first after the op's attributes and " : " (a tensor in
    # registers, or a !ttg.memdesc in shared memory), however many operands come before them.
    first_operands = re.findall(r"ttng\.warp_group_dot [^{:\n]*(?:\{[^}]*\})? : (\S+)", ttgir)
    return {"register_operand": any(operand.startswith("tensor<") for operand in first_operands),
            "pending_waits": [int(n) for n in re.findall(r"ttng\.warp_group_dot_wait[^{]*\{pending(?:s)? = (\d+)", ttgir)]}


@triton.jit
def _register_operand_control(x_ptr, w_ptr, out_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    """The form the check looks for, on purpose: a weight tile made in registers inside the K loop
    (here only scaled) as the first operand, as W4A16's transposed tile had it."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :])
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :])
        acc += tl.dot((w.to(tl.float32) * 2.0).to(tl.bfloat16), tl.trans(x))
    tl.store(out_ptr + rows[None, :] * K + cols[:, None], acc)


@gluon.jit
def _pending_operand_control(x_ptr, w_ptr, out_ptr, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                             BLOCK_K: gl.constexpr):
    """What the SASS walk looks for, on purpose (Gluon): each K tile's weight made in registers as
    the first operand of asynchronous matrix instructions, one tile a loop iteration, the previous
    tile's registers kept until the wait only as the loop-carried copy of them. ptxas then writes
    the next tile's values into registers the pending instructions still read."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_M, 16])
    w_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    x_buf = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, BLOCK_K],
                                      gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.bfloat16))
    x_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
    x_ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
    x_buf.store(gl.load(x_ptr + x_rows[:, None] * BLOCK_K + x_ks[None, :]))
    fence_async_shared()
    cols = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_layout))
    ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, w_layout))
    acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=acc_layout)
    pending = (gl.load(w_ptr + cols[:, None] * K + ks[None, :]).to(gl.float32) * 2.0).to(gl.bfloat16)
    acc = warpgroup_mma(pending, x_buf.permute((1, 0)), acc, use_acc=False, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = (gl.load(w_ptr + cols[:, None] * K + (k0 + ks)[None, :]).to(gl.float32) * 2.0).to(gl.bfloat16)
        acc = warpgroup_mma(w, x_buf.permute((1, 0)), acc, is_async=True)
        acc, pending = warpgroup_mma_wait(num_outstanding=1, deps=(acc, pending))
        pending = w
    acc, pending = warpgroup_mma_wait(num_outstanding=0, deps=(acc, pending))
    out_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))
    out_cols = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
    gl.store(out_ptr + out_rows[None, :] * K + out_cols[:, None], acc)


def control_case():
    """The checks' controls: kernels with the forms, which they must flag."""
    k = 4096
    yield "control", lambda: _register_operand_control[(k // 128,)](
        torch.zeros(64, k, dtype=torch.bfloat16), torch.zeros(k, k, dtype=torch.int8), torch.zeros(64, k), k,
        BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    yield "gluon control", lambda: _pending_operand_control[(k // 64,)](
        torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(k, k, dtype=torch.int8), torch.zeros(64, k), k,
        BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4)


def wna16_cases():
    """Every plan wna16.plan picks for Llama-3-8B's projections (groups of 128 at 2 to 256 rows, of 32
    at 2 to 64; past them the dense path: the library's GEMM), and the pairs kernel's tile shapes
    across its sweep."""
    from runtime.platform.packed import GroupQuantData
    from runtime_triton import wna16

    wna16._hopper = lambda device: True  # the plans wna16.plan picks on an H100 (this is a process of its own)
    pairs = [dict(pairs=True, block_m=m, block_n=n, block_k=k, split_k=split, num_warps=warps, num_stages=stages)
             for m, n, k, split, warps, stages in [(16, 64, 128, 4, 4, 4), (64, 128, 128, 1, 4, 3),
                                                   (128, 128, 64, 1, 8, 3), (256, 128, 128, 1, 8, 3)]]
    pairs += [{**plan, "weight_first": True} for plan in pairs]
    # The Gluon kernel for many rows (its weight from shared memory, one tile's instructions left
    # pending), with its first tile apart (overlap) and without.
    pairs += [dict(wgmma=True, block_m=m, block_n=n, block_k=64, num_warps=warps, num_stages=stages, overlap=overlap)
              for m, n, warps, stages in [(64, 128, 4, 4), (128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 4)]
              for overlap in (False, True)]
    # And with the weight as the first operand, dequantized into the registers it is read from: also
    # the sweep's 8- and 16-row tiles for decode and its four-warpgroup tiles (256 columns, 16 warps).
    pairs += [dict(wgmma=True, weight_first=True, block_m=m, block_n=n, block_k=k, split_k=split, num_warps=n // 16,
                   num_stages=4) for m, n, k, split in [(64, 64, 64, 1), (128, 128, 64, 1), (128, 64, 128, 2),
                                                        (8, 64, 128, 4), (16, 128, 64, 2), (64, 256, 64, 1)]]
    # Groups of 128 rows (GPTQ's) take the pairs kernel up to 256 rows; of 32 (GGUF's) the tile kernel up to 64.
    for group, rows_tried in ((128, (2, 16, 17, 64, 65, 128, 129, 256)), (32, (2, 16, 17, 64))):
        for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
            data = GroupQuantData(torch.zeros(n, k, dtype=torch.uint8), torch.ones(n, k // group),
                                  torch.full((n, k // group), 8.0), 4, group, None)
            weight = wna16.repack(data, torch.bfloat16, torch.device("cpu"))
            for rows in rows_tried:
                x = torch.zeros(rows, k, dtype=torch.bfloat16)
                if (n, k, rows, group) == (28672, 4096, 64, 128):
                    for plan in pairs:
                        kind = "wgmma" if plan.get("wgmma") else "pairs"
                        yield f"wna16 {kind} {plan}", lambda plan=plan: wna16.matmul(weight, x, **plan)
                yield f"wna16 {n}x{k} group {group} rows {rows}", lambda: wna16.matmul(weight, x)


def other_cases():
    """Attention (decode, split, prefill tiles), fused MoE, LoRA and the batch-invariant and skinny
    matmuls at representative sizes."""
    from runtime_triton import batch_invariant, lora, moe, paged_attention, skinny_matmul

    bf16 = torch.bfloat16
    for block_m, tile_n, splits, per_seq in [(16, 32, 1, 1), (16, 64, 4, 1), (32, 32, 1, 8), (64, 64, 1, 128)]:
        seqs, heads, kv_heads, head, block = 4, 32, 8, 128, 16
        query = torch.zeros(seqs * per_seq, heads, head, dtype=bf16)
        workspace = (paged_attention.split_workspace(len(query), heads, head, splits, torch.device("cpu"))
                     if splits > 1 else None)
        yield f"attention block_m {block_m} splits {splits}", lambda: paged_attention.unified_attention(
            query, torch.zeros(64, 2, block, kv_heads, head, dtype=bf16), torch.zeros_like(query),
            torch.arange(seqs + 1, dtype=torch.int32) * per_seq, torch.full((seqs,), 200, dtype=torch.int32),
            torch.zeros(seqs, 16, dtype=torch.int32), seqs, scale=0.1, sliding_window=None, soft_cap=None,
            block_m=block_m, tile_n=tile_n, num_splits=splits, workspace=workspace)
    for tokens in (4, 256):
        yield f"fused_moe tokens {tokens}", lambda: moe.fused_moe(
            torch.zeros(tokens, 1024, dtype=bf16), torch.randn(tokens, 8), torch.zeros(8, 1024, 1024, dtype=bf16),
            torch.zeros(8, 1024, 512, dtype=bf16), 2, True)
    for tokens in (4, 256):
        yield f"linear_lora tokens {tokens}", lambda: lora.linear_lora(
            torch.zeros(tokens, 1024, dtype=bf16), torch.zeros(2048, 1024, dtype=bf16), None,
            torch.zeros(4, 16, 1024, dtype=bf16), torch.zeros(4, 2048, 16, dtype=bf16),
            torch.zeros(tokens, dtype=torch.int32), [2048], 1.0)
    for rows in (1, 256):
        yield f"batch_invariant rows {rows}", lambda: batch_invariant.linear(
            torch.zeros(rows, 1024, dtype=bf16), torch.zeros(2048, 1024, dtype=bf16))
    yield "skinny_matmul rows 16", lambda: skinny_matmul.skinny_matmul(
        torch.zeros(16, 1024, dtype=bf16), torch.zeros(2048, 1024, dtype=bf16))


def sass(cubin: bytes) -> tuple[list[str], dict[str, int]]:
    """The kernel's instructions (predicates dropped) and the index of the instruction at each label."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"), "-c",
                                  file.name], capture_output=True, text=True, check=True).stdout
    instructions, labels = [], {}
    for line in listing.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
        instruction = re.search(r"\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*[^;]*);", line)
        if instruction:
            instructions.append(instruction.group(1))
    return instructions, labels


def serialized_matrix_instructions(cubin: bytes) -> int:
    """How many times the SASS waits for every matrix instruction (``WARPGROUP.DEPBAR.LE gsb0, 0x0``)
    right before issuing more: what ptxas emits when it serializes them (its C7515 advisory), where
    an asynchronous pipeline waits in full only once, after the last."""
    opcodes = sass(cubin)[0]
    return sum(1 for here, after in zip(opcodes, opcodes[1:])
               if here.startswith("WARPGROUP.DEPBAR.LE gsb0, 0x0") and after.startswith("WARPGROUP.ARRIVE"))


# Instructions whose first operand is not a register they write.
_NO_DESTINATION = {"ST", "STS", "STG", "STL", "BAR", "BRA", "EXIT", "WARPGROUP", "LDGSTS", "RED", "MEMBAR", "FENCE",
                   "DEPBAR", "LDGDEPBAR", "NOP", "CCTL", "SYNCS", "HGMMA", "WARPSYNC", "BSYNC", "BSSY", "CALL",
                   "RET", "YIELD", "ATOMS", "REDUX"}


def _written(instruction: str) -> set[int]:
    """The registers an instruction writes: its first operand and, for wide loads and wide products,
    the ones after it."""
    opcode, _, operands = instruction.partition(" ")
    parts = opcode.split(".")
    destination = re.match(r"R(\d+)$", operands.split(",")[0].strip())
    if parts[0] in _NO_DESTINATION or not destination:
        return set()
    width = 4 if "128" in parts else 2 if "64" in parts or "WIDE" in parts else 1
    return set(range(int(destination.group(1)), int(destination.group(1)) + width))


def pending_operand_writes(cubin: bytes) -> int:
    """Writes to a register that an asynchronous matrix instruction reads as its first operand
    (``HGMMA`` with ``R`` operands: four registers a 16-deep step), between its issue and the
    ``WARPGROUP.DEPBAR`` that retires its group. The code is walked in order, then each loop (a
    backward branch) twice from an empty state, so that a loop's pending groups meet its next
    iteration's writes."""
    instructions, labels = sass(cubin)
    found = set()

    def walk(start: int, end: int, passes: int) -> None:
        groups, current = [], set()
        for _ in range(passes):
            for index in range(start, end):
                instruction = instructions[index]
                if instruction.startswith("HGMMA"):
                    operand = re.match(r"R(\d+)$", instruction.split(",")[1].strip())
                    if operand:
                        current |= set(range(int(operand.group(1)), int(operand.group(1)) + 4))
                    if "gsb0" in instruction:
                        groups, current = groups + [current], set()
                wait = re.match(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([0-9a-f]+)", instruction)
                if wait:
                    keep = int(wait.group(1), 16)
                    groups = groups[len(groups) - keep:] if keep else []
                if _written(instruction) & set().union(current, *groups):
                    found.add(index)

    walk(0, len(instructions), 1)
    for index, instruction in enumerate(instructions):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", instruction)
        if target and labels.get(target.group(1), index + 1) <= index:
            walk(labels[target.group(1)], index + 1, 2)
    return len(found)


def survey() -> list[dict]:
    found = []
    # Lazily: each launch runs before its case's loop moves on (the lambdas read loop variables).
    for label, launch in itertools.chain(control_case(), wna16_cases(), other_cases()):
        with recorded_launches() as launches:
            launch()
        for kernel, args, kwargs in launches:
            compiled = compile_for_sm90(kernel, args, kwargs)
            found.append({"label": label, "kernel": kernel.__name__, "gluon": kernel.is_gluon(),
                          **dots(compiled.asm["ttgir"])})
            if kernel.is_gluon():
                found[-1]["serialized"] = serialized_matrix_instructions(compiled.asm["cubin"])
            if found[-1]["register_operand"]:
                found[-1]["pending_operand_writes"] = pending_operand_writes(compiled.asm["cubin"])
    return found


def scan(cache: Path) -> dict:
    """Kernels in a Triton cache compiled with a register first operand left pending, by name."""
    found = {}
    for path in sorted(cache.rglob("*.ttgir")):
        report = dots(path.read_text())
        if report["register_operand"] and any(report["pending_waits"]):
            found.setdefault(path.stem, []).append(path.parent.name)
    return found


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cache"]:
        print(json.dumps(scan(Path(sys.argv[2]).expanduser()), indent=1))
    else:
        print(json.dumps(survey()))
