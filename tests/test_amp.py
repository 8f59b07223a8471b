"""-amp auto: bf16 only where the hardware runs it natively; fp16 + scaler on older CUDA; fp32 otherwise."""
from __future__ import annotations

import pytest
import torch

import engine.amp as amp
from cfg import parse_args
from common.errors import UserError


@pytest.fixture
def flags(monkeypatch):
    def set_flags(*names):
        monkeypatch.setattr(amp, "cpu_flags", lambda: frozenset(("avx2", "fma") + names))
    return set_flags


@pytest.mark.parametrize("names, expected", [((), "none"), (("avx512_bf16",), "bf16"), (("amx_bf16",), "bf16"),
                                             (("avx512f",), "none")])
def test_auto_on_cpu_follows_native_bf16(flags, names, expected):
    flags(*names)
    chosen, reason = amp.choose_amp("auto", torch.device("cpu"))
    assert chosen == expected and reason
    assert ("emulated" in reason) == (expected == "none")


@pytest.mark.parametrize("major, expected", [(9, "bf16"), (8, "bf16"), (7, "fp16")])
def test_auto_on_cuda_follows_capability(monkeypatch, major, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    assert amp.choose_amp("auto", torch.device("cuda", 0))[0] == expected


def test_explicit_values_are_kept_and_emulated_bf16_warns_once(flags, monkeypatch, capsys):
    flags()
    monkeypatch.setattr(amp, "_warned", set())
    assert amp.resolve_amp("none", torch.device("cpu")) == "none"
    assert amp.resolve_amp("bf16", torch.device("cpu")) == "bf16"
    assert amp.resolve_amp("bf16", torch.device("cpu")) == "bf16"
    err = capsys.readouterr().err
    assert err.count("warning: -amp bf16") == 1 and len(err.strip().splitlines()) == 1


def test_auto_announces_its_choice(flags, monkeypatch, capsys):
    flags("avx512_bf16")
    monkeypatch.setattr(amp, "_warned", set())
    assert amp.resolve_amp("auto", torch.device("cpu"), announce=True) == "bf16"
    assert "-amp auto: bf16 (the CPU has avx512_bf16)" in capsys.readouterr().out


def test_autocast_context_resolves_auto(flags):
    from engine.evaluation import autocast_context

    flags()
    with autocast_context("auto", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    flags("amx_bf16")
    with autocast_context("auto", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_cli_default_is_auto_and_values_are_checked():
    assert parse_args("train", [])[0].amp == "auto"
    with pytest.raises(SystemExit):
        parse_args("train", ["-amp", "fast"])
    with pytest.raises(UserError, match="-amp_options"):
        parse_args("benchmark", ["-amp_options", "auto,fp8"])


def test_compile_flag_reaches_train_and_benchmark():
    assert parse_args("train", ["-compile"])[0].compile and not parse_args("train", [])[0].compile
    assert parse_args("benchmark", ["-compile", "-no_plain"])[0].compile
    with pytest.raises(SystemExit):
        parse_args("val", ["-compile"])
