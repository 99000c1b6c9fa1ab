"""An installed wheel carries configs/ and the benchmark data, and the commands that need them run from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from renio_pl.resources import SHIPPED, copy_shipped, shipped_path
from renio_pl.resources import main as configs_main
from tests.conftest import REPO

pytestmark = pytest.mark.slow

# what the source tree needs to build (no runs, virtual environments or caches)
_IGNORE = shutil.ignore_patterns(".git", ".venv", ".ci-venv", "runs", "demo_assets", "lightning_logs", "__pycache__",
                                 "*.egg-info", "build", "dist", ".pytest_cache", "models", ".whl")


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel built from a copy of this checkout (the environment's setuptools, else pip's isolated build)."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=_IGNORE)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(source)]
    done = subprocess.run([*command, "--no-build-isolation"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # setuptools here predates the pyproject's metadata: let pip fetch the build backend
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return next((tmp_path / "dist").glob("renio_pl-*.whl"))


def _throwaway_venv(folder: Path) -> Path:
    """A venv that reuses this environment's installed packages (torch, lightning, ...) through a .pth file."""
    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this environment's site-packages (and those its .pth files add), not the checkout: renio_pl comes from the wheel
    paths = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (Path(purelib) / "000_reuse.pth").write_text("\n".join(paths) + "\n")
    return python


def test_the_checkout_finds_its_own_shipped_files(tmp_path, capsys):
    assert shipped_path("configs/demo.yaml") == REPO / "configs" / "demo.yaml"
    assert shipped_path("evaluation/data/code") == REPO / "evaluation" / "data" / "code"
    written = copy_shipped(tmp_path)
    assert written == [tmp_path / relative for relative in SHIPPED]
    assert (tmp_path / "configs" / "eval" / "gsm8k.yaml").read_text() == (REPO / "configs/eval/gsm8k.yaml").read_text()
    with pytest.raises(SystemExit) as exit_info:  # a second copy would overwrite: one line, exit 2
        configs_main(["--to", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'configs'} already exists; remove it, pick another --to, or pass --overwrite\n"
    )


def test_wheel_ships_configs_and_benchmark_data(tmp_path):
    wheel = _build_wheel(tmp_path)
    # the scripts the sandbox runs by path, not by import: the launcher and the code harness
    assert {"renio_pl/evaluators/sandbox_launcher.py", "renio_pl/evaluators/harness.py"} <= set(
        zipfile.ZipFile(wheel).namelist()
    )
    python = _throwaway_venv(tmp_path / "venv")
    done = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True)
    pip = [python, "-m", "pip"] if done.returncode == 0 else [sys.executable, "-m", "pip", "--python", str(python)]
    done = subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "elsewhere"  # no checkout here or above
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{python.parent}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)

    # the package, the benchmark data the code evaluator reads, and a config: all from the wheel
    done = run(str(python), "-c",
               "import renio_pl; from renio_pl.evaluators.code import DATA_DIR, load_problems; "
               "from renio_pl.demo.run import find_config; "
               "print(renio_pl.__file__); print(DATA_DIR); print(len(load_problems('humaneval'))); print(find_config())")
    assert done.returncode == 0, done.stderr[-3000:]
    package_file, data_dir, problems, demo_config = done.stdout.split()
    installed = Path(package_file).parent
    assert installed.parent != REPO and Path(data_dir) == installed / "_shipped" / "evaluation" / "data" / "code"
    assert int(problems) == 164  # HumanEval+ v0.1.10
    assert Path(demo_config) == installed / "_shipped" / "configs" / "demo.yaml"
    # renio-pl-configs lists and copies them; a shipped evaluation config then parses as written
    done = run(str(python.parent / "renio-pl-configs"), "--list")
    assert done.returncode == 0 and "configs/eval/gsm8k.yaml" in done.stdout.splitlines(), done.stderr[-2000:]
    done = run(str(python.parent / "renio-pl-configs"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "evaluation" / "data" / "math" / "gsm8k_test.jsonl").is_file()
    done = run(str(python.parent / "renio-pl"), "test", "--config", "configs/eval/gsm8k.yaml",
               "--model.student", "some/model", "--print_config")
    assert done.returncode == 0, done.stderr[-2000:]
    # the config's relative data path, found from the working folder (not beside the config), read as that file
    assert f"path: {work / 'evaluation' / 'data' / 'math' / 'gsm8k_test.jsonl'}" in done.stdout
