"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def missing(reason: str) -> None:
    """Skip locally; under CI (CI=true) a missing ../shared must fail the run, not silently pass it."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI=true: tests that need ../shared must not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder beside the repo (../shared); tests that need it skip when it is missing."""
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        missing(f"{path} is missing")
    return path


def reference_file(shared_dir: Path, name: str) -> Path:
    """A file of ../shared/reference; the test skips when it is missing."""
    path = shared_dir / "reference" / name
    if not path.is_file():
        missing(f"{path} is missing")
    return path


def run_python(script: str) -> None:
    """Run `script` in a fresh interpreter at the repository root (what it imports starts from nothing); fail
    with its error output unless it exits 0."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread buys nothing and, on shared cores, costs a lot of waiting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- data-set fixtures (tests/test_datasets.py) ---------------------------------------------------

import numpy as np  # noqa: E402


@pytest.fixture
def make_options():
    """DataOptions factory with small, fast defaults for data tests: make_options(dataset=..., data_path=...)."""
    from cfg import Config
    from datasets import DataOptions

    def make(**overrides):
        values = dict(image_size=32, synthetic_size=8, aug="none", seed=0)
        values.update(overrides)
        if values.get("data_path") is not None:
            values["data_path"] = str(values["data_path"])
        return DataOptions.pick(Config(**values))

    return make


class FakeFiles:
    """Writes small generated images and masks."""

    @staticmethod
    def image(path: Path, height: int = 24, width: int = 32, seed: int = 0) -> Path:
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        return path

    @staticmethod
    def mask(path: Path, values: np.ndarray) -> Path:
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(values, dtype=np.uint8)).save(path)
        return path

    @staticmethod
    def rect(height: int = 24, width: int = 32, box=(6, 4, 18, 20), fg: int = 255, bg: int = 0) -> np.ndarray:
        """Mask with rows box[0]:box[2], columns box[1]:box[3] set to fg."""
        out = np.full((height, width), bg, np.uint8)
        out[box[0]:box[2], box[1]:box[3]] = fg
        return out

    @staticmethod
    def refuge(height: int = 24, width: int = 32) -> np.ndarray:
        """REFUGE grey levels: 255 background, 128 rim (rows 4:20, cols 6:26), 0 cup (rows 8:16, cols 12:20)."""
        out = np.full((height, width), 255, np.uint8)
        out[4:20, 6:26] = 128
        out[8:16, 12:20] = 0
        return out


@pytest.fixture
def fake() -> FakeFiles:
    return FakeFiles()
