"""medsam-peft as an installed package (pip install .).

Layout of the wheel, chosen so that nothing generic lands at the top level of site-packages:

    medsam_peft/__init__.py, cli.py      this file; the console entry points
    medsam_peft/app/                     cfg.py, train.py, val.py, compare.py, benchmark.py and the packages
                                         models/, engine/, common/ (their repository names)
    medsam_peft/datasets/                the repository's datasets/ package, NOT top level: a top-level
                                         `datasets` would shadow Hugging Face's `datasets`

Importing medsam_peft puts medsam_peft/app on sys.path, so the toolkit's own absolute imports
(`from engine import ...`) work unchanged; the data package is imported by its full name
(common/packages.py), so `import datasets` keeps meaning Hugging Face's library in every process.
Running from the repository needs none of this: the top-level names are the repository's folders.

    from medsam_peft import Predictor
"""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parent / "app"
_ROOT = _APP if _APP.is_dir() else Path(__file__).resolve().parents[1]  # installed, else the repository
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Predictor":
        from engine.predictor import Predictor
        return Predictor
    raise AttributeError(name)
