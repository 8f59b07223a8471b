"""Run-folder files: atomic writes, weight files holding only what a run changed, config reading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from common.errors import UserError
from engine.checkpoints import atomic_write, changed_tensors, load_weights, read_run_config, save_weights, write_json


def tiny_model(seed: int, hidden: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 2))
    for p in model[0].parameters():  # a frozen "base" layer
        p.requires_grad_(False)
    with torch.no_grad():  # non-default buffers, so that loading them is visible
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].num_batches_tracked.fill_(seed + 1)
    return model


TRAINABLE = {"1.weight", "1.bias", "2.weight", "2.bias"}
ALL_TENSORS = TRAINABLE | {"0.weight", "0.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}


# ----------------------------------------------------------------------------- atomic_write


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "file.txt"  # parent folders are created
    atomic_write(target, lambda tmp: Path(tmp).write_text("first"))
    atomic_write(target, lambda tmp: Path(tmp).write_text("second"))
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_respects_the_umask(tmp_path, umask):
    """Run files are shared on a cluster: mode 0666 & ~umask like any other file, not mkstemp's 0600."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        write_json(tmp_path / "config.json", {"a": 1})
        save_weights(tmp_path / "best.safetensors", tiny_model(0), False, {})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(plain.stat().st_mode) == expected
    for name in ("config.json", "best.safetensors"):
        assert oct(stat.S_IMODE((tmp_path / name).stat().st_mode)) == oct(expected), name


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "best.safetensors"
    target.write_text("old contents")
    seen = []

    def crashing_writer(tmp):
        seen.append(Path(tmp))
        Path(tmp).write_text("half of the new con")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crashing_writer)
    assert target.read_text() == "old contents"
    assert seen[0].parent == tmp_path and seen[0] != target  # written beside it, then renamed
    assert not seen[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


def test_atomic_write_failure_without_previous_file_leaves_nothing(tmp_path):
    def crashing_writer(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "last.pt", crashing_writer)
    assert list(tmp_path.iterdir()) == []


def test_write_json(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2], "b": 1}


# ----------------------------------------------------------------------------- weights


def test_changed_tensors_selects_trainable_or_everything():
    model = tiny_model(0)
    assert set(changed_tensors(model, full=False)) == TRAINABLE
    assert set(changed_tensors(model, full=True)) == ALL_TENSORS


def test_save_load_round_trip_trainable_only(tmp_path):
    source, dest = tiny_model(0), tiny_model(1)
    frozen_before = {k: v.clone() for k, v in dest.state_dict().items() if k not in TRAINABLE}
    path = tmp_path / "best.safetensors"
    save_weights(path, source, full=False, metadata={"mod": "sam_lora", "epoch": "3"})
    assert set(load_file(str(path))) == TRAINABLE  # the frozen base is not written
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"mod": "sam_lora", "epoch": "3"}
    load_weights(path, dest, full=False)
    for name in TRAINABLE:
        assert torch.equal(dest.state_dict()[name], source.state_dict()[name])
    for name, before in frozen_before.items():  # frozen weights and buffers untouched
        assert torch.equal(dest.state_dict()[name], before)
    assert not torch.equal(dest.state_dict()["0.weight"], source.state_dict()["0.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


def test_save_load_round_trip_full(tmp_path):
    source, dest = tiny_model(0), tiny_model(1)
    path = tmp_path / "best.safetensors"
    save_weights(path, source, full=True, metadata={})
    assert set(load_file(str(path))) == ALL_TENSORS
    load_weights(path, dest, full=True)
    for name, value in source.state_dict().items():
        assert torch.equal(dest.state_dict()[name], value), name
    assert dest.state_dict()["1.num_batches_tracked"].item() == 1


def test_load_weights_shape_mismatch_names_the_path(tmp_path):
    path = tmp_path / "best.safetensors"
    save_weights(path, tiny_model(0, hidden=4), full=False, metadata={})
    with pytest.raises(UserError, match="shape mismatch") as error:
        load_weights(path, tiny_model(0, hidden=5), full=False)
    assert str(path) in str(error.value)


def test_load_weights_missing_keys_names_the_path(tmp_path):
    path = tmp_path / "best.safetensors"
    save_weights(path, tiny_model(0), full=False, metadata={})
    model = tiny_model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="missing") as error:
        load_weights(path, model, full=True)  # a full run expects every tensor
    assert str(path) in str(error.value)
    for name, value in model.state_dict().items():  # nothing half-loaded
        assert torch.equal(value, before[name])


def test_load_weights_unexpected_keys(tmp_path):
    path = tmp_path / "best.safetensors"
    save_weights(path, tiny_model(0), full=True, metadata={})
    with pytest.raises(UserError, match="unexpected") as error:
        load_weights(path, tiny_model(1), full=False)
    assert str(path) in str(error.value)


def test_load_weights_missing_file(tmp_path):
    path = tmp_path / "run" / "best.safetensors"
    with pytest.raises(UserError) as error:
        load_weights(path, tiny_model(0), full=False)
    assert str(path) in str(error.value)


def test_load_weights_unreadable_file(tmp_path):
    path = tmp_path / "best.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError) as error:
        load_weights(path, tiny_model(0), full=False)
    assert str(path) in str(error.value)


# ----------------------------------------------------------------------------- run config


def test_read_run_config_valid(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"mod": "sam_lora", "lr": 0.001}))
    assert read_run_config(str(tmp_path)) == {"mod": "sam_lora", "lr": 0.001}


def test_read_run_config_missing_folder(tmp_path):
    folder = tmp_path / "no_such_run"
    with pytest.raises(UserError) as error:
        read_run_config(str(folder))
    assert str(folder) in str(error.value)


def test_read_run_config_folder_without_config(tmp_path):
    with pytest.raises(UserError) as error:
        read_run_config(str(tmp_path))
    assert str(tmp_path / "config.json") in str(error.value)


def test_read_run_config_broken_json(tmp_path):
    (tmp_path / "config.json").write_text('{"mod": "sam_lora",')
    with pytest.raises(UserError) as error:
        read_run_config(str(tmp_path))
    assert str(tmp_path / "config.json") in str(error.value)
    assert "\n" not in str(error.value)  # one line for the user
