import subprocess
import sys

import pytest
import torch
from torch import nn

import norms
from norms import available_norms, build_norm, register_norm, unregister_norm
from norms.policy import sync_impl

KINDS = ["bn", "brn", "frozenbn", "gn", "none", "syncbn", "syncbrn"]


def test_builtin_kinds():
    assert available_norms() == KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_builds_and_runs_train_and_eval(kind):
    layer = build_norm(kind, 16, eps=1e-3)
    x = torch.randn(4, 16, 5, 5) * 2 + 1
    for mode in (True, False):
        layer.train(mode)
        y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    if kind != "none":
        assert layer.eps == 1e-3


def test_kind_specific_keywords():
    assert build_norm("brn", 8, rmax=2.0).rmax == 2.0
    assert build_norm("gn", 64).num_groups == 32
    assert build_norm("gn", 64, num_groups=8).num_groups == 8
    assert isinstance(build_norm("frozenbn", 8), norms.FrozenBatchNorm2d)


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match=r"unknown norm kind 'batchnorm'.*bn, brn, frozenbn"):
        build_norm("batchnorm", 8)


def test_register_norm_decorator_and_duplicates():
    try:

        @register_norm("ln2d")
        def layer_norm_2d(num_features, eps=1e-5):
            return nn.GroupNorm(1, num_features, eps=eps)

        assert isinstance(build_norm("ln2d", 4), nn.GroupNorm)
        assert "ln2d" in available_norms()
        with pytest.raises(ValueError, match="already registered"):
            register_norm("ln2d")(layer_norm_2d)
        with pytest.raises(ValueError, match="lowercase"):
            register_norm("LN")(layer_norm_2d)
    finally:
        unregister_norm("ln2d")
    assert "ln2d" not in available_norms()


def test_registry_knows_the_batch_norm_family_and_rank_variants():
    family = {k for k in available_norms() if norms.is_batch_norm_kind(k)}
    assert family == {"bn", "brn", "syncbn", "syncbrn", "frozenbn"}
    learning = {k for k in available_norms() if norms.learns_running_stats(k)}
    assert learning == family - {"frozenbn"}
    assert norms.norm_for_rank("bn", 1) is nn.BatchNorm1d
    assert norms.norm_for_rank("brn", 3) is norms.BatchRenorm3d
    assert norms.norm_for_rank("syncbn", 1) is norms.SyncBatchNorm  # rank-agnostic
    with pytest.raises(ValueError, match="frozenbn exists only in 2d"):
        norms.norm_for_rank("frozenbn", 1)
    with pytest.raises(ValueError, match="unknown norm kind 'nope'"):
        norms.is_batch_norm_kind("nope")


def test_kind_facts_are_the_registry_s_and_the_policy_asks_it():
    sync = {k for k in available_norms() if norms.is_sync_kind(k)}
    renorm = {k for k in available_norms() if norms.is_renorm_kind(k)}
    assert sync == {"syncbn", "syncbrn"} and renorm == {"brn", "syncbrn"}
    # A kind registered as synchronized is run through the portable path with no other
    # list to edit.
    register_norm("mysync", batch_norm=True, sync=True)(norms.SyncBatchNorm)
    try:
        assert norms.kind_facts("mysync").learns_running_stats
        assert sync_impl("mysync", 2, "cpu", "gloo") == "portable"
        assert sync_impl("mysync", 1, "cpu", "gloo") == "plain"
    finally:
        unregister_norm("mysync")


def test_import_norms_does_not_import_torchvision():
    # torchvision is heavy, and importing it alone makes 2-process gloo jobs abort at
    # exit now and then; the layer library must not pay for it.
    code = (
        "import sys, norms; assert 'torchvision' not in sys.modules, 'imported'; "
        "norms.convert_norms(norms.build_norm('bn', 4), 'brn'); "
        "assert 'torchvision' not in sys.modules, 'converted'; "
        "norms.FrozenBatchNorm2d; assert 'torchvision' in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
