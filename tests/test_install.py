"""The path users take: build the wheels, install ``runtime[cpu]`` into a fresh venv from them
alone (torch and the other third-party packages already present), and generate text."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers

from hf_reference import hf_greedy
from tiny_models import make_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]
REPO = Path(__file__).resolve().parents[1]
OURS = ("runtime", "runtime_cpu", "runtime-", "__editable__", "runtime_conformance")


def run(*cmd, cwd=None, env=None, timeout=600) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def third_party_site(tmp: Path) -> Path:
    """This environment's site-packages without our own distributions: what a user has before installing."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp / "third_party"
    view.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(OURS) and entry.suffix != ".pth":
            (view / entry.name).symlink_to(entry)
    return view


def test_wheels_install_into_fresh_venv_and_generate(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, REPO, REPO / "plugins" / "cpu")
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == ["runtime", "runtime_cpu"], wheels

    venv = tmp_path / "venv"
    # No pip or setuptools of its own: the user's packages (the view below) are the only ones.
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    Path(purelib, "third_party.pth").write_text(str(third_party_site(tmp_path)) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", "--find-links", dist, "runtime[cpu]")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    located = run(python, "-c", "import runtime, runtime_cpu; print(runtime.__file__); print(runtime_cpu.__file__)",
                  cwd=tmp_path, env=env)
    assert all(line.startswith(purelib) for line in located.split()), located

    checkpoint = make_tiny_checkpoint(tmp_path, "llama")
    prompt = "The capital of France"
    text = run(venv / "bin" / "runtime", "generate", "--model", checkpoint, "--max-tokens", "8", "--ignore-eos",
               "--kv-cache-memory", "16MiB", "--max-model-len", "128", "--dtype", "float32", prompt, cwd=tmp_path, env=env)

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokens, _ = hf_greedy(model, tokenizer.encode(prompt), 8)
    assert text.rstrip("\n") == tokenizer.decode(tokens, skip_special_tokens=True)
