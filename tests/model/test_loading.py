"""Checkpoint resolution (local file/folder, Hub file, short name), strict loading and device parsing.

Nothing here touches the network: a Hub cache is written by hand (tests/hub_cache.py) and read offline.
"""
import os
import sys
import warnings

import pytest
import torch

import leanvae
from leanvae.loading import (SHORT_NAMES, CheckpointError, load_model, parse_device, read_checkpoint,
                             resolve_checkpoint)

import hub_cache  # noqa: E402

pytest.importorskip("huggingface_hub", reason="the hub extra (huggingface_hub) is not installed")

TINY = dict(embedding_dim=32, l_dim=8, h_dim=24, sep_num_layer=1, fusion_num_layer=1, ista_layer_num=1)


def _one_line(exc):
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    snapshot = hub_cache.populate(str(cache))
    return str(cache), snapshot


@pytest.fixture
def offline(monkeypatch, hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", hub[0])
    return hub


def _same_weights(model, path):
    _, state = read_checkpoint(path)
    own = model.state_dict()
    assert own.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_from_pretrained_short_name_offline_from_a_hand_made_cache(offline):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at the hand-made cache: no network, weights from the cache."""
    model = leanvae.LeanVAE.from_pretrained("leanvae-4ch")
    assert isinstance(model, leanvae.LeanVAE) and not model.training
    assert model.args.latent_dim == 4 and model.latent_bottleneck.phi.shape == (4, 512)
    _same_weights(model, os.path.join(offline[1], "LeanVAE-dim4.ckpt"))


def test_16_channel_short_name_with_explicit_cache_dir_and_local_files_only(monkeypatch, hub):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    model = load_model("leanvae-16ch", cache_dir=hub[0], local_files_only=True)
    assert model.args.latent_dim == 16 and not model.training
    _same_weights(model, os.path.join(hub[1], "LeanVAE-dim16.ckpt"))


@pytest.mark.parametrize("name", ["Yumic/LeanVAE/LeanVAE-dim4.ckpt", "hf://Yumic/LeanVAE/LeanVAE-dim4.ckpt", "leanvae-4ch"])
def test_hub_names_resolve_to_the_cached_snapshot(offline, name):
    expected = os.path.join(offline[1], "LeanVAE-dim4.ckpt")
    assert os.path.samefile(resolve_checkpoint(name), expected)
    assert os.path.samefile(resolve_checkpoint(name, revision=hub_cache.COMMIT), expected)


def test_short_names_are_the_published_files():
    assert SHORT_NAMES == {"leanvae-4ch": ("Yumic/LeanVAE", "LeanVAE-dim4.ckpt"),
                           "leanvae-16ch": ("Yumic/LeanVAE", "LeanVAE-dim16.ckpt")}


def test_offline_and_not_cached_says_what_to_download_and_how(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(CheckpointError) as info:
        leanvae.LeanVAE.from_pretrained("leanvae-4ch")
    text = _one_line(info.value)
    assert "Yumic/LeanVAE" in text and "LeanVAE-dim4.ckpt" in text and "HF_HUB_OFFLINE" in text
    assert "hf download Yumic/LeanVAE LeanVAE-dim4.ckpt" in text
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(CheckpointError, match="local_files_only=True") as info:
        resolve_checkpoint("Yumic/LeanVAE/LeanVAE-dim16.ckpt", local_files_only=True, revision="v9")
    text = _one_line(info.value)
    assert "LeanVAE-dim16.ckpt" in text and "--revision v9" in text


def test_missing_huggingface_hub_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("leanvae-16ch")
    assert "leanvae-kernels[hub]" in _one_line(info.value)
    path = hub_cache.write_checkpoint(str(tmp_path / "local.ckpt"), **TINY)
    assert resolve_checkpoint(path) == path  # local files never need it


def test_local_folder_and_unknown_names(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="holds no"):
        resolve_checkpoint(str(folder))
    torch.save({"args": {}}, folder / "a.ckpt")
    (folder / "notes.txt").write_text("x")
    assert resolve_checkpoint(folder) == str(folder / "a.ckpt")
    torch.save({"args": {}}, folder / "b.pt")
    with pytest.raises(CheckpointError, match="holds 2 checkpoint files") as info:
        resolve_checkpoint(str(folder))
    _one_line(info.value)
    with pytest.raises(CheckpointError, match="leanvae-4ch") as info:
        resolve_checkpoint("leanvae-8ch")
    _one_line(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(str(tmp_path / "missing.ckpt"))
    with pytest.raises(TypeError, match="checkpoint"):
        resolve_checkpoint(3)


def test_checkpoint_without_weights_is_an_error_unless_not_strict(tmp_path):
    path = tmp_path / "args_only.ckpt"
    torch.save({"args": dict(vars(leanvae.make_args(**TINY)))}, path)
    with pytest.raises(CheckpointError, match="no 'state_dict'") as info:
        load_model(str(path))
    _one_line(info.value)
    with pytest.warns(UserWarning, match="no 'state_dict'"):
        assert load_model(str(path), strict=False).args.l_dim == 8
    # The published-API loader is strict about it too (it kept random weights silently).
    with pytest.raises(ValueError, match="no 'state_dict'"):
        leanvae.LeanVAE.load_from_checkpoint(str(path))
    with pytest.warns(UserWarning, match="no 'state_dict'"):
        leanvae.LeanVAE.load_from_checkpoint(str(path), strict=False)


def test_mismatched_keys_summarised_in_one_line_and_not_strict_loads_what_fits(tmp_path):
    torch.manual_seed(0)
    source = leanvae.LeanVAE.from_config(**TINY)
    state = source.state_dict()
    dropped = [k for k in state if k.startswith("decoder.")][:5]
    for k in dropped:
        del state[k]
    state["extra.weight"] = torch.zeros(3)
    state["std_layer.weight"] = torch.zeros(7, 7)
    path = tmp_path / "bad.ckpt"
    torch.save({"args": dict(vars(source.args)), "state_dict": state}, path)
    with pytest.raises(CheckpointError) as info:
        leanvae.LeanVAE.from_pretrained(str(path))
    text = _one_line(info.value)
    assert "5 missing" in text and dropped[0] in text and "1 unexpected (extra.weight)" in text
    assert "1 of the wrong shape (std_layer.weight: checkpoint (7, 7)" in text and "strict=False" in text
    with pytest.warns(UserWarning, match="5 missing") as record:
        model = leanvae.LeanVAE.from_pretrained(str(path), strict=False)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    loaded = model.state_dict()
    for k, v in source.state_dict().items():
        if k not in dropped and k != "std_layer.weight":
            assert torch.equal(loaded[k], v), k


def test_unreadable_and_foreign_files_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as info:
        load_model(str(junk))
    _one_line(info.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a LeanVAE checkpoint") as info:
        load_model(str(foreign))
    _one_line(info.value)
    with pytest.raises(CheckpointError, match="'args' must be a dict"):
        torch.save({"args": [1, 2], "state_dict": {}}, foreign)
        load_model(str(foreign))


def test_argparse_namespace_args_load_without_unsafe_unpickling(tmp_path):
    source = leanvae.LeanVAE.from_config(**TINY)
    path = tmp_path / "ns.ckpt"
    torch.save({"args": leanvae.make_args(**TINY), "state_dict": source.state_dict()}, path)
    model = load_model(str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_parse_device_names_the_option_and_what_exists(monkeypatch):
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    assert parse_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_device("auto") == parse_device(None)
    with pytest.raises(ValueError, match="--device: 'bogus' is not a device") as info:
        parse_device("bogus", option="--device")
    assert "cpu" in _one_line(info.value)
    with pytest.raises(TypeError, match="device"):
        parse_device(3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda' is not available") as info:
        parse_device("cuda", option="--device")
    assert _one_line(info.value).startswith("--device:") and "this machine has: cpu" in str(info.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="'cuda:7' does not exist") as info:
        parse_device("cuda:7")
    assert "cuda:0" in _one_line(info.value)
    assert parse_device("cuda:0") == torch.device("cuda", 0)


def test_load_model_checks_the_device_before_any_download(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device: 'cuda:1' is not available"):
        load_model("leanvae-4ch", device="cuda:1")


def test_cli_reconstruct_with_a_short_name_offline(offline, tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV (the [video] extra) is not installed")
    import numpy as np

    from leanvae.cli import main
    from leanvae.video import read_video, write_video

    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    write_video(str(src), np.full((9, 16, 16, 3), 100, np.uint8), fps=8)
    assert main(["reconstruct", str(src), str(dst), "--checkpoint", "leanvae-4ch", "-q"]) == 0
    assert "9 frames 16x16" in capsys.readouterr().out
    assert read_video(str(dst))[0].shape == (9, 16, 16, 3)
