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
import shutil
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
WHEELS = ["runtime", "runtime_conformance", "runtime_cpu", "runtime_cuda", "runtime_gaudi", "runtime_metal", "runtime_rocm",
          "runtime_tpu", "runtime_triton"]
PROMPT = "The capital of France"
# What `runtime plugins` says of each platform without its hardware (the start of the reason).
UNAVAILABLE_HERE = {"rocm": "torch is not a ROCm build", "tpu": "torch_xla is not installed",
                    "gaudi": "habana_frameworks.torch is not installed", "metal": "Metal needs macOS"}
# What pip must install for each extra besides runtime and runtime-cpu.
EXTRA_DISTRIBUTIONS = {"cpu": set(), "cuda": {"runtime-cuda", "runtime-triton"},
                       # Their hardware SDKs (a ROCm torch, torch-xla, habana_frameworks, MPS) are the user's to install.
                       "rocm,tpu,gaudi,metal": {"runtime-rocm", "runtime-triton", "runtime-tpu", "runtime-gaudi", "runtime-metal"}}


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


def build_wheels(repo: Path, dist: Path) -> None:
    # This environment's setuptools builds them: the same wheels, without fetching build tools.
    run("bash", repo / "scripts" / "build-wheels.sh", "--no-build-isolation",
        env=dict(os.environ, WHEEL_DIR=str(dist), PYTHON=sys.executable))
    assert sorted(p.name.split("-")[0] for p in dist.glob("*.whl")) == WHEELS
    assert {p.name.split("-")[1] for p in dist.glob("*.whl")} == {release.__version__}


def install(view: Path, tmp: Path, extra: str, *requirements) -> tuple[Path, dict]:
    """``pip install REQUIREMENTS`` into a fresh venv: its python, and what pip installed (name -> report item).

    Asserts it installed this release of runtime, runtime-cpu and the extra's distributions, and nothing else:
    the view satisfied torch, triton and the rest.
    """
    python, purelib = fresh_venv(tmp / "venv", view)
    report = tmp / "pip-report.json"
    # As documented, with this machine's pip configuration: the public index stays reachable.
    run(sys.executable, "-m", "pip", "--python", python, "install", *requirements, "--report", report, cwd=tmp)
    installed = {item["metadata"]["name"]: item for item in json.loads(report.read_text())["install"]}
    assert set(installed) == {"runtime", "runtime-cpu", *EXTRA_DISTRIBUTIONS[extra]}, (requirements, sorted(installed))
    for name, item in installed.items():
        assert item["metadata"]["version"] == release.__version__, (requirements, name, item["metadata"]["version"])

    # From outside the repository, whose egg-info would answer the metadata look-ups.
    located = run(python, "-c", "import runtime.release as r; print(r.__file__); print(r.identity_problem())",
                  **outside(tmp))
    assert located.split("\n")[:2] == [str(Path(purelib, "runtime", "release.py")), "None"], (requirements, located)
    assert (python.parent / "runtime").is_file(), f"{requirements}: pip installed no `runtime` command"
    return python, installed


def outside(tmp: Path) -> dict:
    return {"cwd": tmp, "env": {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(third-party view, snapshot repository, its wheels), built once for both tests: from the
    snapshot, so the build leaves the working tree's folders alone."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    tmp = tmp_path_factory.mktemp("built")
    view, repo, wheels = third_party_site(tmp), snapshot(tmp), tmp / "dist"
    build_wheels(repo, wheels)
    return view, repo, wheels


def test_install_from_wheels_with_the_public_index_reachable(built, tmp_path):
    # One test, not one per extra: each extra is a fresh venv from the same wheels.
    view, _, wheels = built
    checkpoint, expected = reference_text(tmp_path)
    for extra in ("cpu", "cuda"):
        tmp = Path(tempfile.mkdtemp(prefix=extra, dir=tmp_path))
        # No --no-index: PyPI's unrelated runtime 0.1.4 is a candidate too.
        python, installed = install(view, tmp, extra, "--find-links", wheels, f"runtime[{extra}]")
        for name, item in installed.items():
            assert item["download_info"]["url"].startswith(wheels.as_uri()), (extra, name, item["download_info"])

        runtime = python.parent / "runtime"
        listing = run(runtime, "plugins", **outside(tmp))
        assert f"runtime {release.__version__} ({release.PROJECT_URL})" in listing, listing
        for name in set(installed) - {"runtime"}:
            assert f"  {name} {release.__version__}\n" in listing, listing
        assert "MISMATCH" not in listing and "platform cpu: available" in listing, listing

        text = run(runtime, "generate", "--model", checkpoint, "--device", "cpu", "--max-tokens", "8", "--ignore-eos",
                   "--kv-cache-memory", "16MiB", "--max-model-len", "128", "--dtype", "float32", PROMPT, **outside(tmp))
        assert text.rstrip("\n") == expected, extra

    # The other platforms' extras, into one venv: each plugin installs without its hardware SDK and
    # says, in `runtime plugins`, what is missing.
    extras = "rocm,tpu,gaudi,metal"
    tmp = Path(tempfile.mkdtemp(prefix="others", dir=tmp_path))
    python, installed = install(view, tmp, extras, "--find-links", wheels, f"runtime[{extras}]")
    listing = run(python.parent / "runtime", "plugins", **outside(tmp))
    for name, reason in UNAVAILABLE_HERE.items():
        assert f"platform {name}: unavailable: {reason}" in listing, listing


def snapshot(tmp: Path) -> Path:
    """The working tree as the only commit of a new git repository: what ``git+URL`` fetches."""
    files = run("git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    repo = tmp / "repo"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    git = ["git", "-C", repo, "-c", "user.name=test", "-c", "user.email=test@example.org"]
    run(*git, "init", "-q")
    run(*git, "add", "-A")
    run(*git, "commit", "-q", "-m", "snapshot")
    return repo


def simple_index(wheels: Path, tmp: Path) -> Path:
    """A PEP 503 index of the wheels: what a project index serves for this project's names."""
    root = tmp / "simple"
    for wheel in wheels.glob("*.whl"):
        project = root / wheel.name.split("-")[0].replace("_", "-")
        project.mkdir(parents=True)
        (project / "index.html").write_text(f'<a href="{wheel.as_uri()}">{wheel.name}</a>\n')
    return root


def test_every_documented_install_command_gets_this_project(built, tmp_path):
    """docs/install.md's other commands, each into a fresh venv (the wheels command is the test above)."""
    view, repo, wheels = built
    # A host, even for a local path: pip's requirement parser wants one in a git+file URL.
    url = f"git+file://localhost{repo}"
    commands = {
        "index": ["--index-url", simple_index(wheels, tmp_path).as_uri(), "runtime[cuda]"],
        "wheel": ["--find-links", wheels, f"{wheels}/runtime-{release.__version__}-py3-none-any.whl[cuda]"],
        # Built by pip from its clones; --no-build-isolation only spares fetching setuptools three times.
        "git": ["--no-build-isolation", f"runtime[cuda] @ {url}", f"runtime-cpu @ {url}#subdirectory=plugins/cpu",
                f"runtime-cuda @ {url}#subdirectory=plugins/cuda", f"runtime-triton @ {url}#subdirectory=plugins/triton"],
    }
    for form, requirements in commands.items():
        _, installed = install(view, Path(tempfile.mkdtemp(prefix=form, dir=tmp_path)), "cuda", *requirements)
        sources = {name: item["download_info"] for name, item in installed.items()}
        if form == "git":
            assert all(info.get("vcs_info", {}).get("vcs") == "git" for info in sources.values()), sources
        else:
            assert all(info["url"].startswith(wheels.as_uri()) for info in sources.values()), (form, sources)
