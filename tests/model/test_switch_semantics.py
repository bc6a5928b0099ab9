"""Semantics of repeated switching (layers), pickling, user subclasses and models with nothing to switch.
The switch's contract is in leanvae/fused/switch.py's docstring."""
import copy
import io
import os
import pickle
import random

import pytest
import torch
import torch.nn as nn
from test_use_fused_kernels import foreign_copy, make_model

import leanvae
from leanvae.fused import switch
from leanvae.fused.switch import use_fused_kernels

TINY = dict(embedding_dim=32, l_dim=8, h_dim=24, sep_num_layer=1, fusion_num_layer=1, ista_layer_num=1)
CLASSES = [leanvae.Patcher, leanvae.UnPatcher, leanvae.PEG3D, leanvae.NAF, leanvae.ResNAF, leanvae.ISTA]


def _clip(t=5, h=16, w=16):
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, t, h, w, generator=g) - 0.5


def _outputs(model, x):
    with torch.no_grad():
        z = model.encode(x)
        return z, model.decode(z)


def _class_state():
    return {cls: dict(vars(cls)) for cls in CLASSES}


def _instance_attrs(model):
    """Every instance attribute a switch could have left: methods and __getstate__."""
    return {(name, k) for name, m in model.named_modules() for k in ("forward", "recon", "__getstate__")
            if k in vars(m)}


def _own_slots(model):
    """The bookkeeping entries of this model's modules and of our classes (other tests may leave models of
    their own switched: those are not this test's business)."""
    mine = {id(m) for m in model.modules()} | {id(c) for c in CLASSES}
    return [(t, slots) for t, slots in list(switch._SLOTS.items()) if id(t) in mine]


def _check_layers(model, handles):
    """Every replaced method is the newest layer of a handle still held, and no layer belongs to a handle
    that was reverted: what runs is always what the live handles say."""
    live = {id(h) for h in handles}
    for target, slots in _own_slots(model):
        for name, slot in slots.items():
            assert slot.layers, (target, name)
            assert all(id(h) in live for h, _ in slot.layers), f"{name}: a reverted handle's layer is still there"
            assert vars(target)[name] is slot.layers[-1][1], f"{name}: not the newest layer"
    for h in handles:
        assert h.active and all(any(o is h for o, _ in switch._SLOTS[t][n].layers) for t, n in h._held)


def _random_sequence(model, rng, steps):
    """Random instance/class switches and reverts; returns the handles still held."""
    handles = []
    for _ in range(steps):
        r = rng.random()
        if r < 0.3 and handles:
            handles.pop(rng.randrange(len(handles))).revert()
        elif r < 0.75:
            groups = {g: rng.random() < 0.7 for g in ("haar", "conv", "ista", "ffd")}
            if not any(groups.values()):
                groups["conv"] = True
            handles.append(use_fused_kernels(model, backend=rng.choice(["cpu", "reference", "auto"]), **groups))
        else:
            handles.append(use_fused_kernels(backend=rng.choice(["cpu", "auto"]), conv=rng.random() < 0.5))
        _check_layers(model, handles)
    return handles


def _check_sequences(model, n, seed):
    x = _clip()
    expected = _outputs(model, x)
    classes_before = _class_state()
    rng = random.Random(seed)
    for i in range(n):
        handles = _random_sequence(model, rng, rng.randint(1, 8))
        if i % 8 == 0:  # now and then, the switched model must still run
            _outputs(model, x)
        rng.shuffle(handles)
        for k, h in enumerate(handles):
            h.revert()
            assert not h.active
            _check_layers(model, handles[k + 1:])
        h_again = handles[0] if handles else None
        if h_again is not None:
            h_again.revert()  # twice is harmless
        assert _instance_attrs(model) == set(), f"sequence {i}: instance attributes left"
        assert _class_state() == classes_before, f"sequence {i}: a class is still patched"
        assert not _own_slots(model), f"sequence {i}: bookkeeping left"
        if i % 20 == 0 or i == n - 1:
            got = _outputs(model, x)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"sequence {i}: outputs differ"


def test_random_switch_and_revert_sequences_end_at_the_original():
    torch.manual_seed(0)
    _check_sequences(leanvae.LeanVAE.from_config(**TINY).eval(), 200, seed=1)


def test_lookalike_classes_random_sequences():
    torch.manual_seed(0)
    _check_sequences(foreign_copy(leanvae.LeanVAE.from_config(**TINY).eval()), 200, seed=2)


PUBLISHED_SRC = os.environ.get("LEANVAE_PUBLISHED_SRC")


@pytest.mark.skipif(not PUBLISHED_SRC, reason="set LEANVAE_PUBLISHED_SRC to a published LeanVAE checkout")
def test_published_classes_random_sequences():
    import argparse

    from test_published_parity import load_published, seeded_weights

    published = load_published(PUBLISHED_SRC)
    model = published(argparse.Namespace(**{**leanvae.DEFAULT_ARGS, **TINY})).eval()
    model.load_state_dict(seeded_weights(model))
    _check_sequences(model, 200, seed=3)


def test_second_switch_rebinds_and_reverts_in_any_order():
    torch.manual_seed(0)
    m = leanvae.LeanVAE.from_config(**TINY).eval()
    peg = m.encoder.low_layer.dconv_layer[0]
    h1 = use_fused_kernels(m, backend="cpu")
    f1 = vars(peg)["forward"]
    h2 = use_fused_kernels(m, backend="reference", conv=True, haar=False, ista=False, ffd=False)
    assert vars(peg)["forward"] is not f1  # the newest layer runs
    h1.revert()  # the older handle goes first: h2's layer stays
    assert h2.active and not h1.active and "forward" in vars(peg)
    assert "forward" not in vars(m.encoder.patcher) if hasattr(m.encoder, "patcher") else True
    h2.revert()
    assert _instance_attrs(m) == set()


def test_class_and_instance_layers_mixed():
    torch.manual_seed(0)
    m = leanvae.LeanVAE.from_config(**TINY).eval()
    x = _clip()
    expected = _outputs(m, x)
    original = vars(leanvae.PEG3D)["forward"]
    hc = use_fused_kernels(backend="cpu")
    hi = use_fused_kernels(m, backend="cpu")
    hc.revert()
    assert vars(leanvae.PEG3D)["forward"] is original and hi.active
    hc2 = use_fused_kernels()
    hi.revert()
    hc2.revert()
    assert vars(leanvae.PEG3D)["forward"] is original
    assert all(torch.equal(a, b) for a, b in zip(_outputs(m, x), expected))


@pytest.mark.parametrize("how", ["torch_save", "pickle", "deepcopy"])
def test_switched_model_saves_as_the_plain_model(how):
    torch.manual_seed(0)
    m = leanvae.LeanVAE.from_config(**TINY).eval()
    x = _clip()
    expected = _outputs(m, x)
    h = use_fused_kernels(m, backend="cpu")
    fused = _outputs(m, x)
    if how == "torch_save":
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    elif how == "pickle":
        loaded = pickle.loads(pickle.dumps(m))
    else:
        loaded = copy.deepcopy(m)
    assert _instance_attrs(loaded) == set()  # the plain model: no fused method, no __getstate__
    assert all(torch.equal(a, b) for a, b in zip(_outputs(loaded, x), expected))
    # The original is still switched, and still reverts exactly.
    assert h.active and all(torch.equal(a, b) for a, b in zip(_outputs(m, x), fused))
    h.revert()
    assert _instance_attrs(m) == set()
    # The loaded model can be switched itself.
    with use_fused_kernels(loaded, backend="cpu"):
        got = _outputs(loaded, x)
    assert all(torch.equal(a, b) for a, b in zip(got, fused))


class MyPEG3D(leanvae.PEG3D):
    """A user's subclass with its own forward (doubles the conv output)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_user_subclass_with_own_forward_is_left_alone():
    torch.manual_seed(0)
    m = leanvae.LeanVAE.from_config(**TINY).eval()
    for naf in (m.encoder.low_layer, m.decoder.low_layer):
        naf.dconv_layer[0].__class__ = MyPEG3D
    x = _clip()
    expected = _outputs(m, x)
    with use_fused_kernels(m, backend="cpu") as h:
        assert any("MyPEG3D defines its own forward" in s for s in h.skipped), h.skipped
        got = _outputs(m, x)
    for a, b in zip(got, expected):  # the override still runs (the fused rest agrees to float32 rounding)
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    # ... and the override matters: without it the output is far off (the check above can fail).
    plain = leanvae.LeanVAE.from_config(**TINY).eval()
    plain.load_state_dict(m.state_dict())
    assert (_outputs(plain, x)[1] - expected[1]).abs().max() > 1e-2 * expected[1].abs().max()


def test_subclass_without_own_forward_is_switched():
    class Tagged(leanvae.PEG3D):
        pass

    torch.manual_seed(0)
    m = leanvae.LeanVAE.from_config(**TINY).eval()
    m.encoder.low_layer.dconv_layer[0].__class__ = Tagged
    with use_fused_kernels(m, backend="cpu") as h:
        assert any("encoder.low_layer.dconv_layer.0: Tagged.forward" in r for r in h.replaced)
        assert not h.skipped


@pytest.mark.parametrize("model", [nn.Linear(4, 4), nn.Sequential(nn.Conv3d(2, 2, 3))], ids=["linear", "conv3d"])
def test_nothing_recognised_raises(model):
    with pytest.raises(ValueError, match="no LeanVAE module recognised"):
        use_fused_kernels(model)


def test_every_group_off_raises():
    m = leanvae.LeanVAE.from_config(**TINY).eval()
    with pytest.raises(ValueError, match="every group"):
        use_fused_kernels(m, haar=False, conv=False, ista=False, ffd=False)
    assert _instance_attrs(m) == set()
