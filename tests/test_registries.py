"""Every registered mode and net is consistent with the rest of the toolkit (no list to edit here)."""
from __future__ import annotations

import dataclasses

import pytest

from cfg import MODES, Config, parse_args
from common.errors import UserError
from models.modes import get_mode, mode_names, mode_options
from models.registry import encoder_names, net_entry, net_names

MODE_SPECS = [get_mode(name) for name in mode_names()]
NET_PAIRS = [(net, encoder) for net in net_names() for encoder in encoder_names(net)]


@pytest.mark.parametrize("spec", MODE_SPECS, ids=lambda spec: spec.name)
def test_mode_declaration_is_usable(spec) -> None:
    assert callable(spec.load_apply())
    fields = {f.name for f in dataclasses.fields(Config)}
    assert spec.options <= fields, "a mode's options are Config fields (and so CLI flags)"
    assert spec.name in MODES
    assert not (spec.saves_all and spec.adapter_prefix), "full fine-tuning adds no adapters"


@pytest.mark.parametrize("spec", MODE_SPECS, ids=lambda spec: spec.name)
def test_cfg_accepts_exactly_the_declared_options(spec) -> None:
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name in sorted(mode_options()):
        field, choices = fields[name], fields[name].metadata["choices"]
        value = [] if field.type == "bool" else [choices[-1]] if choices else ["0.2"] if "float" in field.type \
            else ["12"]
        argv = ["-mod", spec.name, "-net", "mobile_sam", f"-{name}", *value]
        if name in spec.options:
            parse_args("train", argv)
        else:
            with pytest.raises(UserError, match=f"-{name}"):
                parse_args("train", argv)


@pytest.mark.parametrize("net,encoder", NET_PAIRS)
def test_net_declares_its_adapt_targets(net: str, encoder: str) -> None:
    entry = net_entry(net, encoder)
    assert entry.adapt_targets is not None and entry.adapt_targets.linears and entry.adapt_targets.blocks
    argv = ["-net", net, "-encoder", encoder, "-lora_conv"]
    if entry.adapt_targets.convs:
        parse_args("train", argv)
    else:
        with pytest.raises(UserError, match="-lora_conv"):
            parse_args("train", argv)
