"""Where the toolkit's data package lives: top-level `datasets` when running from the repository, and
`medsam_peft.datasets` when installed (pip install .), where a top-level `datasets` would shadow Hugging Face's
`datasets` library. Code outside the package imports it through `data_module` so both layouts work."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve()
INSTALLED = (_HERE.parents[1].name, _HERE.parents[2].name) == ("app", "medsam_peft")  # medsam_peft/app/common/
DATASETS = "medsam_peft.datasets" if INSTALLED else "datasets"


def data_module(submodule: str = "") -> ModuleType:
    """The data package (or one of its modules, e.g. "nifti") under the name of the current layout."""
    return importlib.import_module(f"{DATASETS}.{submodule}" if submodule else DATASETS)
