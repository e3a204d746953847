"""Triton's code for the plugin's kernels on Hopper, read on any machine: tests/sm90_dots.py compiles
each kernel for sm_90 as its launcher launches it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_no_kernel_leaves_a_register_operand_matrix_instruction_pending():
    """Every Triton kernel of the plugin as its launcher launches it (the W4A16 plans the op picks
    for Llama-3-8B's projections, the pairs kernel's tiles, attention, fused MoE, LoRA, the
    batch-invariant and skinny matmuls), compiled for sm_90: no Triton kernel takes a matrix
    instruction's first operand from registers and leaves it pending past a wait (Triton then lets
    the next K tile overwrite those registers: tests/sm90_dots.py), and no Gluon kernel's SASS
    writes such a register before the wait that retires it. A kernel written with each form is
    its check's control."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_dots.py"))], capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    pending = [f for f in found if f["register_operand"] and any(f["pending_waits"]) and not f["gluon"]]
    assert [f["label"] for f in pending] == ["control"], pending
    # Gluon kernels may leave register operands pending (their waits keep the registers alive):
    # the SASS must not write those registers before the wait that retires the instructions.
    # The Gluon control keeps only a copy alive, and ptxas writes them.
    written = [f for f in found if f.get("pending_operand_writes")]
    assert [f["label"] for f in written] == ["gluon control"], written
    # The weight-first W4A16 kernel's registers stay pending a tile, its instructions asynchronous.
    weight_first = [f for f in found if f["kernel"] == "wna16_wgmma_weight_first_kernel"]
    assert weight_first and all(f["register_operand"] and 1 in f["pending_waits"] and f["serialized"] == 0
                                for f in weight_first), weight_first
    kernels = {f["kernel"] for f in found}
    assert {"_wna16_kernel", "_wna16_pairs_kernel", "wna16_wgmma_kernel",
            "unified_attention_kernel", "_gate_up_kernel", "_down_kernel", "_linear_lora_kernel", "_matmul_kernel",
            "_skinny_matmul_kernel"} <= kernels, kernels
    # The Gluon W4A16 kernel's point: each K tile's matrix instructions still run while the next is
    # dequantized. Its overlap plans keep them asynchronous through ptxas too; without the first tile
    # apart ptxas serializes them (the control: so the SASS check sees it).
    wgmma = [f for f in found if f["kernel"] == "wna16_wgmma_kernel"]
    assert wgmma and all(1 in f["pending_waits"] and not f["register_operand"] for f in wgmma), wgmma
    overlapped = [f for f in wgmma if "'overlap': True" in f["label"]]
    assert overlapped and all(f["serialized"] == 0 for f in overlapped), overlapped
    assert any(f["serialized"] for f in wgmma if "'overlap': False" in f["label"]), wgmma
    # The plans wna16.plan picks (labelled by shape and group) are all of the asynchronous kind.
    picked = [f for f in wgmma if " group " in f["label"]]
    assert picked and all(f["serialized"] == 0 for f in picked), picked
