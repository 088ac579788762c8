"""The package as users install it: one import name, hlwq, beside anybody's top-level `tasks`.

The wheel is built from a copy of the sources (`pip wheel --no-deps`, an isolated build as
`pip install` makes it) and installed, together with a small package that provides a top-level
`tasks` module, into a fresh virtualenv. That venv borrows this environment's dependencies
through a .pth file written after the install, so pip sees an empty environment and nothing
big is downloaded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FOLDERS = PYPROJECT["tool"]["setuptools"]["package-dir"]      # import name -> source folder
DATA_FILES = ("store/policies/ltx23.toml", "store/policies/generic.toml",
              "store/prompt_suite/v1.jsonl", "store/prompt_suite/README.md", "tasks/gates.toml")
OTHER_TASKS = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "someone-elses-tasks"
version = "1.0"

[tool.setuptools]
packages = ["tasks"]
"""


def run(*command, cwd: Path) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy: an in-tree build would leave build/ in the repository."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in set(FOLDERS.values()):
        shutil.copytree(REPO / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", base / "dist", source,
        cwd=base)
    (built,) = (base / "dist").glob("hlwq_pipeline-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new virtualenv holding the wheel and a package whose top-level module is `tasks`."""
    base = tmp_path_factory.mktemp("venv")
    other = base / "other"
    (other / "tasks").mkdir(parents=True)
    (other / "tasks" / "__init__.py").write_text('OWNER = "someone else"\n')
    (other / "pyproject.toml").write_text(OTHER_TASKS)
    venv = base / "fresh"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=base)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel,
        other, cwd=base)
    site_packages = Path(run(python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                             cwd=base).strip())
    borrowed = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (site_packages / "zz-borrowed-dependencies.pth").write_text("\n".join(borrowed) + "\n")
    return venv


def test_the_wheel_holds_hlwq_only_with_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names}
    assert tops == {"hlwq", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for package, folder in FOLDERS.items():
        prefix = package.replace(".", "/")
        for module in (REPO / folder).glob("*.py"):
            assert f"{prefix}/{module.name}" in names, f"{folder}/{module.name} not in the wheel"
    for data in DATA_FILES:
        assert f"hlwq/{data}" in names, data
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hlwq = hlwq.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_hlwq_installs_beside_a_package_that_owns_tasks(fresh_venv, tmp_path):
    check = """
import sys
import tasks
import hlwq.tasks
from hlwq import load_pipeline
from hlwq.store.policy import load_policy
from hlwq.store.prompts import DEFAULT_SUITE
from hlwq.tasks.gates import DEFAULT_GATES_FILE

assert tasks.OWNER == "someone else" and sys.modules["tasks"] is not hlwq.tasks
assert hlwq.tasks.__file__.startswith(sys.prefix), hlwq.tasks.__file__
assert load_pipeline.__module__ == "hlwq.runtime.loader"
assert load_policy("ltx23").name and DEFAULT_SUITE.is_file() and DEFAULT_GATES_FILE.is_file()
print("ok", hlwq.__file__)
"""
    # -I: no current directory on sys.path, so the checkout's own folders cannot answer
    out = run(fresh_venv / "bin" / "python", "-I", "-c", check, cwd=tmp_path)
    assert out.startswith("ok ") and str(fresh_venv) in out
    assert "Usage: hlwq" in run(fresh_venv / "bin" / "hlwq", "--help", cwd=tmp_path)
