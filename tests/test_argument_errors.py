"""Argument strings with a value of the wrong kind fail naming the argument and what it expects,
on every path that takes one: kaon.create_optimizer and kaon battery --optimizer."""

from __future__ import annotations

import pytest
import torch

import kaon
from kaon import cli
from kaon.battery import entry_from_spec


@pytest.mark.parametrize("name", ["Adakaon", "torch.optim.SGD", torch.optim.SGD])
def test_create_optimizer_names_the_argument(name):
    p = [torch.nn.Parameter(torch.zeros(3))]
    # torch's own SGD would fail with "'<' not supported between instances of 'str' and 'float'"
    with pytest.raises(ValueError, match=r"lr='abc': lr expects a number"):
        kaon.create_optimizer(name, p, "lr=abc")
    with pytest.raises(ValueError, match=r"lr='abc': lr expects a number"):
        kaon.create_optimizer(name, p, lr="abc")  # keyword arguments are checked too


@pytest.mark.parametrize("args, named", [
    ("lr=abc", r"lr='abc': lr expects a finite number > 0"),
    ("lr=-1", r"lr=-1: lr expects a finite number > 0"),
    ("lr=0.1,lr_const=fast", r"lr_const='fast': lr_const expects a finite number > 0"),
    ("lr=0.1,momentum=abc", r"momentum='abc': momentum expects a number"),
    ("lr=0.1,nesterov=maybe", r"nesterov expects True or False"),
])
def test_battery_optimizer_spec_names_the_argument(args, named, capsys, tmp_path):
    with pytest.raises(ValueError, match=rf"--optimizer 'torch.optim:SGD': .*{named}"):
        entry_from_spec("torch.optim:SGD", args)
    # the command fails before any training, with the same message
    code = cli.main(["battery", "--profile", "tiny", "--no-progress", "--out", str(tmp_path),
                     "--optimizer", "torch.optim:SGD", args])
    assert code == 2 and "--optimizer 'torch.optim:SGD'" in capsys.readouterr().err
    assert not (tmp_path / "cache.json").exists()
    assert entry_from_spec("torch.optim:SGD", "lr=0.05,momentum=0.9").lr == 0.05
