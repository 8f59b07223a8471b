"""The package builds (sdist, then the wheel FROM the sdist) and installs into a clean venv; the installed
entry points and the Python API work outside the repository, and nothing named `datasets` lands at the top
level of site-packages. The venv uses --system-site-packages so the pinned stack (torch is ~5 GB) is not
downloaded again; the build runs setuptools offline (--no-build-isolation)."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*command, cwd: Path, env=None) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})})
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_sdist_and_wheel_build_and_install_in_a_clean_venv(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(dist)!r})", cwd=REPO)
    sdist = next(dist.glob("medsam_peft-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "src", filter="data")
    source = next((tmp_path / "src").iterdir())
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, ".", cwd=source)
    wheel = next(dist.glob("medsam_peft-*.whl"))

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-index", "--no-deps", wheel, cwd=tmp_path)  # deps: the system stack
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "usage" in run(venv / "bin" / "medsam-train", "-h", cwd=elsewhere).lower()
    assert "usage" in run(venv / "bin" / "medsam-val", "-h", cwd=elsewhere).lower()
    out = run(python, "-c", "import importlib.util, numpy as np, medsam_peft\n"
              "from medsam_peft import Predictor\n"
              "print('datasets spec:', importlib.util.find_spec('datasets'))\n"
              "p = Predictor.from_base('lite_medsam', device='cpu'); p.set_image(np.zeros((60, 80, 3), np.uint8))\n"
              "masks, scores = p.predict(box=[10, 10, 50, 40]); print('masks', masks.shape)\n"
              "import engine; print('engine from', engine.__file__)", cwd=elsewhere)
    assert "datasets spec: None" in out and "masks (1, 60, 80)" in out and "/medsam_peft/app/engine" in out
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=elsewhere).strip())
    assert not (site / "datasets").exists() and (site / "medsam_peft" / "datasets" / "__init__.py").is_file()
