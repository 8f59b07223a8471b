"""Console entry points of the installed package: medsam-train, medsam-val, medsam-compare, medsam-benchmark
(each is the repository script of the same name, with the same flags)."""
from __future__ import annotations

import importlib

import medsam_peft  # noqa: F401  (puts the toolkit's modules on sys.path)


def _run(script: str) -> None:
    from common.cli import run_cli

    run_cli(importlib.import_module(script).main)


def train() -> None:
    _run("train")


def val() -> None:
    _run("val")


def compare() -> None:
    _run("compare")


def benchmark() -> None:
    _run("benchmark")
