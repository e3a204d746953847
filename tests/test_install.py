"""The path users take (docs/install.md): build the wheels with scripts/build-wheels.sh, then install
``runtime[cpu]`` and ``runtime[cuda]`` into fresh venvs with ``--find-links dist`` and the public index
reachable, where PyPI offers an unrelated ``runtime`` 0.1.4. The installed ``runtime`` must be ours,
and its command must generate text on the CPU.

The venvs see this environment's third-party packages (torch 2.13 CPU, triton, transformers, ...)
through a .pth file, as a user's environment would already hold them: nothing large is downloaded,
and the test checks that pip installed our wheels and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from hf_reference import hf_greedy
from runtime import release
from tiny_models import make_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]
REPO = Path(__file__).resolve().parents[1]
OURS = ("runtime", "runtime_cpu", "runtime-", "__editable__", "runtime_conformance")
WHEELS = ["runtime", "runtime_conformance", "runtime_cpu", "runtime_cuda"]
PROMPT = "The capital of France"


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


def fresh_venv(path: Path, view: Path) -> tuple[Path, str]:
    """A venv whose only packages are the third-party view: (its python, its purelib)."""
    # No pip or setuptools of its own: pip runs from here with --python.
    run(sys.executable, "-m", "venv", "--without-pip", path)
    python = path / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    Path(purelib, "third_party.pth").write_text(f"{view}\n")
    return python, purelib


def reference_text(directory: Path) -> tuple[Path, str]:
    """A tiny checkpoint and HF transformers' greedy continuation of PROMPT on it."""
    checkpoint = make_tiny_checkpoint(directory, "llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokens, _ = hf_greedy(model, tokenizer.encode(PROMPT), 8)
    return checkpoint, tokenizer.decode(tokens, skip_special_tokens=True)


def build_wheels(dist: Path) -> None:
    # This environment's setuptools builds them: the same wheels, without fetching build tools.
    run("bash", REPO / "scripts" / "build-wheels.sh", "--no-build-isolation",
        env=dict(os.environ, WHEEL_DIR=str(dist), PYTHON=sys.executable))
    assert sorted(p.name.split("-")[0] for p in dist.glob("*.whl")) == WHEELS
    assert {p.name.split("-")[1] for p in dist.glob("*.whl")} == {release.__version__}


def install_and_generate(extra: str, wheels: Path, view: Path, model: tuple[Path, str], tmp: Path) -> None:
    """``pip install --find-links WHEELS runtime[EXTRA]`` into a fresh venv; then check it as a user would."""
    python, purelib = fresh_venv(tmp / "venv", view)
    report = tmp / "pip-report.json"
    # The documented command, index and all (no --no-index): PyPI's 'runtime' is a candidate too.
    run(sys.executable, "-m", "pip", "--python", python, "install", "--find-links", wheels, f"runtime[{extra}]",
        "--report", report)
    installed = {item["metadata"]["name"]: item for item in json.loads(report.read_text())["install"]}
    plugins = {"runtime-cpu", f"runtime-{extra}"}
    # Ours, from the wheels, and nothing else: the view satisfied torch, triton and the rest.
    assert set(installed) == {"runtime", *plugins}, (extra, sorted(installed))
    for name, item in installed.items():
        assert item["metadata"]["version"] == release.__version__, (extra, name, item["metadata"]["version"])
        assert item["download_info"]["url"].startswith(wheels.as_uri()), (extra, name, item["download_info"]["url"])

    # From outside the repository, whose egg-info would answer the metadata look-ups.
    here = {"cwd": tmp, "env": {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}}
    located = run(python, "-c", "import runtime.release as r; print(r.__file__); print(r.identity_problem())", **here)
    assert located.split("\n")[:2] == [str(Path(purelib, "runtime", "release.py")), "None"], (extra, located)

    runtime = python.parent / "runtime"
    assert runtime.is_file(), f"runtime[{extra}]: pip installed no `runtime` command"
    listing = run(runtime, "plugins", **here)
    assert f"runtime {release.__version__} ({release.PROJECT_URL})" in listing, listing
    for name in plugins:
        assert f"  {name} {release.__version__}\n" in listing, listing
    assert "MISMATCH" not in listing and "platform cpu: available" in listing, listing

    checkpoint, expected = model
    text = run(runtime, "generate", "--model", checkpoint, "--device", "cpu", "--max-tokens", "8", "--ignore-eos",
               "--kv-cache-memory", "16MiB", "--max-model-len", "128", "--dtype", "float32", PROMPT, **here)
    assert text.rstrip("\n") == expected, extra


def test_install_from_wheels_with_the_public_index_reachable(tmp_path):
    # One test, not one per extra: both would rebuild the wheels in the same source folders at once.
    wheels, view = tmp_path / "dist", third_party_site(tmp_path)
    build_wheels(wheels)
    model = reference_text(tmp_path)
    for extra in ("cpu", "cuda"):
        install_and_generate(extra, wheels, view, model, Path(tempfile.mkdtemp(prefix=extra, dir=tmp_path)))
