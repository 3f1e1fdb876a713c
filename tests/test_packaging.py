"""A regular install (`pip install .`, a wheel) carries data/ and kernels/ and finds them.

README installs with `pip install -e .`, which reads data/ from the repository; a wheel has no
repository next to the package, so setup.cfg ships the files under share/minihuatuo/ and
minihuatuo/engine/paths.py looks there. This test builds the wheel from a copy of the sources, installs it
into a fresh virtual environment and reads the world from outside the repository.
"""
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from minihuatuo.engine.paths import bundled

REPO = Path(__file__).resolve().parent.parent
BUNDLED_DIRS = ("data", "kernels")


def bundled_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for d in BUNDLED_DIRS for p in (root / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_bundled_prefers_the_repository_then_the_share_folders(tmp_path):
    repo, share = tmp_path / "repo", tmp_path / "share"
    (share / "data" / "world").mkdir(parents=True)
    assert bundled("data/world", [repo, share]) == share / "data" / "world"
    (repo / "data" / "world").mkdir(parents=True)
    assert bundled("data/world", [repo, share]) == repo / "data" / "world"
    assert bundled("data/nothing.tsv", [repo, share]) == repo / "data" / "nothing.tsv"  # errors name the clone's path


def test_a_wheel_install_carries_the_world_and_the_kernel_sources(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info next to setup.cfg
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("minihuatuo", *BUNDLED_DIRS):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "wheel"])
    wheel = next((tmp_path / "wheel").glob("minihuatuo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("/share/minihuatuo/", 1)[1] for n in names if "/share/minihuatuo/" in n}
    missing, extra = bundled_files(REPO) - shipped, shipped - bundled_files(REPO)
    assert not missing and not extra, f"setup.cfg [options.data_files] is out of date: missing {sorted(missing)}, " \
                                      f"extra {sorted(extra)}"

    env = tmp_path / "env"
    venv.create(env, with_pip=False)  # no system site-packages: the editable install here must not answer
    python = env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel])
    code = ("from minihuatuo.engine import paths\nfrom minihuatuo.services import verifier_text\n"
            "from minihuatuo.world import kb as world\n"
            "kb = world.load_kb()\n"
            "print(world.WORLD_DIR, verifier_text.DEFAULT_ALIASES, paths.bundled('kernels'), len(kb.conditions), sep='\\n')")
    out = run([python, "-c", code], cwd=tmp_path).splitlines()
    share = str(Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('data'))"]).strip())
                / "share" / "minihuatuo")
    assert out[0] == f"{share}/data/world" and out[1] == f"{share}/data/aliases.tsv" and out[2] == f"{share}/kernels"
    assert int(out[3]) >= 60
    assert (Path(share) / "data/world/base/model.safetensors").stat().st_size == \
        (REPO / "data/world/base/model.safetensors").stat().st_size
