"""Every mistake a user can make on the command line ends in one line naming the fix and a non-zero exit.

The walk runs `leanvae.cli.main` in-process (fast); `python -m leanvae` calls the same function and exits
with its status (tests/test_cli.py runs it as a process).
"""
import os
import numpy as np
import pytest
import torch

import leanvae
from leanvae.cli import main

TINY = dict(embedding_dim=32, l_dim=8, h_dim=24, sep_num_layer=1, fusion_num_layer=1, ista_layer_num=1)
HAS_CUDA = torch.cuda.is_available()


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of `python -m leanvae *argv`, in-process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(argv, capsys, *needles):
    code, out, err = run_cli(argv, capsys)
    assert code not in (0, None), (argv, out, err)
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, (argv, err)
    for needle in needles:
        assert needle in lines[0], (argv, lines[0], needle)
    return lines[0]


BENCH = [
    (["--repeats", "0"], ["--repeats", ">= 1"]),
    (["--repeats", "x"], ["--repeats", "integer"]),
    (["--warmup", "-1"], ["--warmup", ">= 0"]),
    (["--batch", "0"], ["--batch", ">= 1"]),
    (["--size", "0x16"], ["--size", "positive"]),
    (["--size=-8x16"], ["--size", "positive"]),
    (["--size", "big"], ["--size", "HxW"]),
    (["--frames", "6", "--size", "16x16"], ["1+4k"]),
    (["--frames", "-3", "--size", "16x16"], ["1+4k"]),
    (["--frames", "5", "--size", "12x16"], ["multiples of 8"]),
    (["--latent-dim", "5"], ["--latent-dim", "choice"]),
    (["--backend", "fast"], ["--backend", "choice"]),
    (["--device", "bogus"], ["--device", "'bogus' is not a device", "cpu"]),
    (["--device", "cuda:99"], ["--device", "cuda:99"]),
    (["--dtype", "float64"], ["--dtype"]),
]
if not HAS_CUDA:
    BENCH += [
        (["--device", "cuda"], ["--device", "'cuda' is not available", "this machine has: cpu"]),
        (["--backend", "cuda", "--size", "16x16", "--frames", "5"], ["--backend cuda cannot run on cpu", "--backend auto"]),
    ]


@pytest.mark.parametrize("argv, needles", BENCH, ids=[" ".join(a) for a, _ in BENCH])
def test_bench_bad_input(argv, needles, capsys):
    assert_one_line_error(["bench"] + argv, capsys, *needles)


def test_bench_output_file_problems_are_found_before_the_run(tmp_path, capsys):
    small = ["bench", "--size", "16x16", "--frames", "5", "--repeats", "1", "--quiet"]
    assert_one_line_error(small + ["--json", str(tmp_path / "no" / "dir" / "x.json")], capsys,
                          "output folder does not exist", str(tmp_path / "no" / "dir"))
    assert_one_line_error(small + ["--json", str(tmp_path)], capsys, "is a folder")
    if os.geteuid() != 0:  # root may write anywhere: the check cannot fail there
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_line_error(small + ["--json", str(locked / "x.json")], capsys, "not writable")
    assert list(tmp_path.iterdir()) == ([tmp_path / "locked"] if os.geteuid() != 0 else [])


def test_top_level_usage_mistakes(capsys):
    assert_one_line_error([], capsys, "command")
    assert_one_line_error(["frobnicate"], capsys, "frobnicate")
    assert_one_line_error(["info", "--bogus"], capsys, "--bogus")


def test_info_with_a_bad_backend_setting(monkeypatch, capsys):
    monkeypatch.setenv("LEANVAE_KERNELS_BACKEND", "junk")
    assert_one_line_error(["info"], capsys, "LEANVAE_KERNELS_BACKEND", "junk")


av = pytest.importorskip("av", reason="PyAV (the [video] extra) is not installed")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from leanvae.video import write_video

    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    model = leanvae.LeanVAE.from_config(**TINY)
    paths = {k: str(root / v) for k, v in dict(ckpt="tiny.ckpt", clip="in.mp4", garbage="garbage.ckpt",
                                                 foreign="foreign.pt", args_only="args_only.ckpt",
                                                 mismatch="mismatch.ckpt", bad_video="bad.mp4").items()}
    model.save_checkpoint(paths["ckpt"])
    write_video(paths["clip"], np.full((9, 16, 16, 3), 128, np.uint8), fps=8)
    with open(paths["garbage"], "wb") as f:
        f.write(b"not a torch file\n" * 10)
    torch.save({"model": {}}, paths["foreign"])
    torch.save({"args": dict(vars(model.args))}, paths["args_only"])
    other = leanvae.LeanVAE.from_config(**{**TINY, "latent_dim": 16})
    torch.save({"args": dict(vars(model.args)), "state_dict": other.state_dict()}, paths["mismatch"])
    with open(paths["bad_video"], "wb") as f:
        f.write(b"\x00" * 100)
    paths["root"] = str(root)
    return paths


def test_reconstruct_bad_input(files, tmp_path, monkeypatch, capsys):
    clip, ckpt, out = files["clip"], files["ckpt"], str(tmp_path / "out.mp4")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    cases = [
        ([str(tmp_path / "missing.mp4"), out, "--checkpoint", ckpt], ["input video not found"]),
        ([files["bad_video"], out, "--checkpoint", ckpt], ["cannot decode video"]),
        ([clip, str(tmp_path / "no" / "out.mp4"), "--checkpoint", ckpt], ["output folder does not exist"]),
        ([clip, str(tmp_path), "--checkpoint", ckpt], ["is a folder"]),
        ([clip, clip, "--checkpoint", ckpt], ["same file", "another output path"]),
        ([clip, out, "--checkpoint", ckpt, "--frames", "6"], ["--frames must be 1+4k"]),
        ([clip, out, "--checkpoint", ckpt, "--frames", "0"], ["--frames must be 1+4k"]),
        ([clip, out, "--checkpoint", ckpt, "--frames", "13"], ["has 9 frames, fewer than --frames 13"]),
        ([clip, out, "--checkpoint", ckpt, "--chunk-frames", "8"], ["--chunk-frames must be 1+4k"]),
        ([clip, out, "--checkpoint", ckpt, "--tile-size", "64x64", "--parallel"], ["--tile-size cannot be combined"]),
        ([clip, out, "--checkpoint", ckpt, "--tile-size", "12x12"], ["--tile-size 12x12"]),
        ([clip, out, "--checkpoint", ckpt, "--device", "bogus"], ["--device", "is not a device"]),
        ([clip, out, "--checkpoint", ckpt, "--device", "cuda:99"], ["--device", "cuda:99"]),
        ([clip, out, "--checkpoint", ckpt, "--dtype", "int8"], ["--dtype"]),
        ([clip, out], ["--checkpoint"]),
        ([clip, out, "--checkpoint", str(tmp_path / "missing.ckpt")], ["missing.ckpt' not found", "leanvae-4ch"]),
        ([clip, out, "--checkpoint", files["garbage"]], ["not a readable torch checkpoint"]),
        ([clip, out, "--checkpoint", files["foreign"]], ["not a LeanVAE checkpoint"]),
        ([clip, out, "--checkpoint", files["args_only"]], ["no 'state_dict'"]),
        ([clip, out, "--checkpoint", files["mismatch"]], ["does not fit", "of the wrong shape"]),
        ([clip, out, "--checkpoint", files["root"]], ["holds"]),  # a folder with several checkpoints
        ([clip, out, "--checkpoint", "leanvae-4ch"], ["HF_HUB_OFFLINE", "hf download Yumic/LeanVAE LeanVAE-dim4.ckpt"]),
        ([clip, out, "--checkpoint", "leanvae-32ch"], ["leanvae-4ch", "leanvae-16ch"]),
    ]
    if not HAS_CUDA:
        cases.append(([clip, out, "--checkpoint", ckpt, "--device", "cuda"], ["--device", "not available"]))
    for argv, needles in cases:
        assert_one_line_error(["reconstruct"] + argv, capsys, *needles)
    assert not os.path.exists(out) and [p.name for p in tmp_path.iterdir()] == []  # nothing written, not even a partial file


def test_info_op_table_columns_are_aligned(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = out[out.index(next(line for line in out if line.startswith("ops ("))) + 1:]
    assert rows
    starts = {line.index(" cpu ") if " cpu " in line else line.index(" cuda ") for line in rows}
    assert len(starts) == 1, rows  # the device column starts at the same place on every row


# The commands that joined the others later (check, convert, verify, decode) walk the same way.
LATER = [
    (["check", "--device", "bogus"], ["device", "'bogus'"]),
    (["check", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["convert"], ["checkpoint, out_dir"]),
    (["convert", "CKPT", "OUT", "--variant", "wan9"], ["--variant", "wan9"]),
    (["convert", "MISSING", "OUT"], ["not found"]),
    (["convert", "NOT_A_CHECKPOINT", "OUT"], ["not a readable torch checkpoint", "torch.save"]),
    (["verify", "MISSING"], ["is not a folder"]),
    (["decode", "MISSING", "--out", "OUT"], ["index.jsonl"]),
]
if not HAS_CUDA:
    LATER.append((["check", "--device", "cuda"], ["no CUDA device"]))


@pytest.mark.parametrize("argv, needles", LATER, ids=[" ".join(a) for a, _ in LATER])
def test_later_commands_bad_input(argv, needles, tmp_path, capsys):
    if argv[0] == "convert" and len(argv) > 1:
        pytest.importorskip("diffusers")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    names = {"CKPT": str(junk), "OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing"),
             "NOT_A_CHECKPOINT": str(junk)}
    assert_one_line_error([names.get(a, a) for a in argv], capsys, *needles)
