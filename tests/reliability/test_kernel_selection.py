"""What runs the model is never silent: ``runtime plugins`` gives the contract version, each
plugin's status (a contract mismatch with both ranges), attention backends, kernels and
quantization methods; the engine's start-up report names the attention backend, the quantization
method and every fallback (a backend of higher priority passed over and why, ops left to the
reference kernels), and a plugin skipped for its contract is warned about on the way."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from runtime.platform import CONTRACT_VERSION, get_registry

from tiny_models import make_tiny_checkpoint

# A faster CPU attention backend for head size 64 only (the tiny model's heads are 16 wide), and
# a plugin written for an older contract.
FAST = '''
from runtime.platform import hookimpl
from runtime_cpu.attention import CpuAttentionBackend

RUNTIME_CONTRACT = ">=1.0,<2"

class FastAttention(CpuAttentionBackend):
    name = "fast_attn"
    priority = 1000
    supported_head_sizes = (64,)

@hookimpl
def runtime_attention_backends():
    return [FastAttention]
'''
OLD = "RUNTIME_CONTRACT = '>=0.1,<1'\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins")
    (path / "fast_plugin.py").write_text(textwrap.dedent(FAST))
    (path / "old_plugin.py").write_text(OLD)
    dist = path / "extra_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[runtime.platforms]\nfast = fast_plugin\nold = old_plugin\n")
    return dict(os.environ, PYTHONPATH=str(path), PYTHONWARNINGS="default")


def run(env, *args):
    out = subprocess.run([sys.executable, "-m", "runtime.cli", *args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out


def test_plugins_names_the_contract_and_every_choice(env):
    out = run(env, "plugins")
    assert f"plugin contract {CONTRACT_VERSION}" in out.stdout
    old = next(line for line in out.stdout.splitlines() if line.startswith("old "))
    assert "skipped" in old and f"supports contract >=0.1,<1, this runtime implements {CONTRACT_VERSION}" in old
    assert "runtime plugin 'old' (extra-plugins 0.1) skipped" in out.stderr  # the warning, not silence
    assert re.search(r"^fast +extra-plugins 0.1 +loaded", out.stdout, re.MULTILINE), out.stdout
    assert "platform cpu: available; priority 0; attention: fast_attn, cpu_sdpa" in out.stdout
    kernels = next(line for line in out.stdout.splitlines() if line.startswith("  kernels: "))
    assert set(re.findall(r"(\w+)=", kernels)) == set(get_registry().kernels("cpu").sources)
    assert re.search(r"^  quantization: .*\bgguf\b.*\bint8\b", out.stdout, re.MULTILINE), out.stdout


def test_start_up_names_the_backend_the_quantization_and_the_fallbacks(env, tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path, "llama")
    out = run(env, "--log-level", "INFO", "generate", "--model", str(checkpoint), "--max-tokens", "2",
              "--kv-cache-memory", "16MiB", "--quantization", "int8", "hi")
    report = next(line for line in out.stderr.splitlines() if "fallbacks:" in line)
    assert "platform cpu" in report and "attention cpu_sdpa, quantization int8" in report, report
    assert "attention fast_attn (head size 16 not in (64,))" in report, report
    reference = [op for op, source in get_registry().kernels("cpu").sources.items() if source == "reference"]
    assert f"reference kernels for {', '.join(reference)}" in report, report
    assert "runtime plugin 'old' (extra-plugins 0.1) skipped" in out.stderr
