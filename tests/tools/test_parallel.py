"""leanvae.parallel: a clip split into bands of token rows across 2, 3 and 4 gloo ranks gives
the single-process result, encode and decode, untiled and temporally tiled, reference and fused conv;
and the error paths raise clearly on every rank instead of hanging.

One spawned launch per world size runs every configuration (a tiny model, 1 thread per rank); the
processes have a process-group timeout and the launch a wall-clock limit, so a bug fails, never hangs.

Bound: the gathered output against the single-process reference model, max|diff| <= 1e-6 * max|ref|
(float32). Why it is not zero: the band's conv (nn.Conv3d on a shorter frame, or the fused kernel) and
the GEMMs on fewer rows may sum in a different order than the whole-frame call; each output is a short
chain of float32 sums (27 conv taps, GEMMs of K <= 64), so differences stay at a few ulps of the
largest value (measured ~1e-7 here), while an error in the halo (a zero row, a row from the wrong
neighbour or frame) changes outputs at O(1) relative size (checked below: zero halos must fail it).
"""
import datetime
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers import ROOT

REL_BOUND = 1e-6
WORLD_SIZES = (2, 3, 4)
LAUNCH_TIMEOUT_S = 120
# Token rows (= latent rows) of the test clip per world size: none divides evenly.
ROWS = {2: 5, 3: 7, 4: 6}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model():
    import numpy as np

    import leanvae

    torch.manual_seed(0)
    np.random.seed(0)
    return leanvae.LeanVAE.from_config(
        l_dim=8, h_dim=8, embedding_dim=16, latent_dim=4, sep_num_layer=1, fusion_num_layer=1,
        ista_iter_num=1, ista_layer_num=1, chunksize_enc=5, chunksize_dec=2,
    ).eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _expect_error(fn, exc, words):
    try:
        fn()
    except exc as e:
        msg = str(e)
        return all(w in msg for w in words)
    return False


def _worker(rank, world, port, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    import leanvae.parallel as lp

    model = _tiny_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 9, 8 * ROWS[world], 16, generator=gen)  # 9 frames: 2 encoder chunks of 5 / 4 frames
    res = {}
    with torch.no_grad():
        for tile in (False, True):
            model.set_tile_inference(tile)
            z_ref = model.encode(x)  # z: 3 latent frames: 2 decoder chunks (chunksize_dec=2) when tiled
            model.set_tile_inference(tile)
            x_ref = model.decode(z_ref)
            for fused in (False, True):
                model.set_tile_inference(tile)
                z = lp.gather_bands(lp.encode(model, lp.split_clip(x, rank, world), fused=fused))
                model.set_tile_inference(tile)
                xr = lp.gather_bands(lp.decode(model, lp.split_clip(z_ref, rank, world, latent=True), fused=fused))
                key = f"tile={tile},fused={fused}"
                res[f"encode,{key}"] = [list(z.shape) == list(z_ref.shape), _rel(z, z_ref)]
                res[f"decode,{key}"] = [list(xr.shape) == list(x_ref.shape), _rel(xr, x_ref)]
        # An image (B, 3, H, W): one frame, decoded with is_image=True.
        model.set_tile_inference(False)
        img = x[:, :, 0]
        zi_ref = model.encode(img)
        xi_ref = model.decode(zi_ref, is_image=True)
        zi = lp.gather_bands(lp.encode(model, lp.split_clip(img, rank, world)))
        xi = lp.gather_bands(lp.decode(model, lp.split_clip(zi_ref, rank, world, latent=True), is_image=True))
        res["encode,image"] = [list(zi.shape) == list(zi_ref.shape), _rel(zi, zi_ref)]
        res["decode,image"] = [list(xi.shape) == list(xi_ref.shape), _rel(xi, xi_ref)]
        model.set_tile_inference(False)

        # The check has teeth: the same bands with zero halos (each rank alone) miss the bound.
        groups = [dist.new_group([r]) for r in range(world)]
        solo = groups[rank]
        zb = lp.encode(model, lp.split_clip(x, rank, world), group=solo)  # group of one: the plain path
        z_solo = lp.gather_bands(zb)
        z_ref = model.encode(x)
        res["zero_halo_fails_bound"] = [True, _rel(z_solo, z_ref)]
        # A group of one is the plain path, bit for bit.
        xb = lp.split_clip(x, rank, world)
        res["group_of_one_is_plain"] = [bool(torch.equal(lp.encode(model, xb, group=solo), model.encode(xb))), 0.0]

        # Ranks disagreeing on the shape: every rank raises (no hang).
        bad = xb if rank else xb[..., :8]
        res["shape_mismatch_raises"] = [_expect_error(lambda: lp.encode(model, bad), ValueError, ["disagree"]), 0.0]
        # A band without a whole token row (rank 0 holds 0 rows): every rank raises.
        xs = lp.split_clip(x, rank, world)
        small = xs[..., :0, :] if rank == 0 else xs
        res["empty_band_raises"] = [_expect_error(lambda: lp.encode(model, small), ValueError, ["token rows"]), 0.0]
        small_z = z_ref[..., :0, :] if rank == world - 1 else lp.split_clip(z_ref, rank, world, latent=True)
        res["empty_latent_band_raises"] = [_expect_error(lambda: lp.decode(model, small_z), ValueError, ["token rows"]), 0.0]
        # The gloo group with a non-CPU band (meta stands in for CUDA here) and nccl with a CPU band.
        res["gloo_non_cpu_raises"] = [
            _expect_error(lambda: lp._check_device(torch.empty(1, device="meta"), None, "encode"), ValueError, ["gloo"]), 0.0]
        orig = dist.get_backend
        try:
            dist.get_backend = lambda group=None: "nccl"
            res["nccl_cpu_raises"] = [_expect_error(lambda: lp._check_device(xb, None, "encode"), ValueError, ["nccl", "CUDA"]), 0.0]
        finally:
            dist.get_backend = orig
        # A model patched with fused modules would lose the halo silently: refused.
        import leanvae

        patched = _tiny_model()
        handle = leanvae.use_fused_kernels(patched)
        try:
            res["patched_model_refused"] = [_expect_error(lambda: lp.encode(patched, xb), TypeError, ["reference"]), 0.0]
        finally:
            handle.revert()
    # Autograd on: refused on every rank (gradients would miss the halo), not silently wrong.
    res["grad_mode_refused"] = [_expect_error(lambda: lp.encode(model, xb), RuntimeError, ["no_grad"]), 0.0]
    dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


_RESULTS = {}


def _launch(world, tmp_path_factory):
    if world not in _RESULTS:
        out = str(tmp_path_factory.mktemp(f"par{world}") / "res.json")
        ctx = mp.start_processes(_worker, args=(world, _free_port(), out), nprocs=world, join=False, start_method="spawn")
        try:
            import time

            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{world}-rank launch did not finish in {LAUNCH_TIMEOUT_S} s (hang?)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        with open(out) as f:
            _RESULTS[world] = json.load(f)
    return _RESULTS[world]


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_parallel_matches_single_process(world, tmp_path_factory):
    res = _launch(world, tmp_path_factory)
    exact = {k: v for k, v in res.items() if k.startswith(("encode", "decode"))}
    assert len(exact) == 10
    for key, (same_shape, rel) in exact.items():
        assert same_shape, key
        assert rel <= REL_BOUND, f"{world} ranks, {key}: max rel diff {rel:.3g} > {REL_BOUND}"
    print(f"{world} ranks max rel diff:", max(v[1] for v in exact.values()))
    # Zero halos (no exchange) must be far outside the bound, or the check above proves nothing.
    assert res["zero_halo_fails_bound"][1] > 1e3 * REL_BOUND


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_parallel_errors(world, tmp_path_factory):
    res = _launch(world, tmp_path_factory)
    for key in ("group_of_one_is_plain", "shape_mismatch_raises", "empty_band_raises", "empty_latent_band_raises",
                "gloo_non_cpu_raises", "nccl_cpu_raises", "patched_model_refused", "grad_mode_refused"):
        assert res[key][0], f"{world} ranks: {key}"


def test_split_rows():
    import leanvae.parallel as lp

    assert lp.split_rows(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert lp.split_rows(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="at least one token row"):
        lp.split_rows(3, 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        lp.split_clip(torch.zeros(1, 3, 1, 12, 8), 0, 1)


def test_not_initialised_is_clear():
    import torch.distributed as dist

    import leanvae.parallel as lp

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        lp.encode(_tiny_model(), torch.zeros(1, 3, 1, 8, 8))


def test_cli_bench_parallel_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 -m leanvae bench --parallel` on a tiny clip: rank 0 reports per-rank
    figures and the gathered result agrees with one process (the command exits 1 otherwise)."""
    import subprocess
    import sys

    root = ROOT
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "rep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "leanvae", "bench", "--parallel", "--frames", "5", "--size", "24x16", "--repeats", "1",
           "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=root, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["world"] == 2 and [r["token_rows"] for r in rep["ranks"]] == [2, 1]
    assert rep["agreement"]["max_rel"] <= REL_BOUND
    assert "rank 1:" in proc.stdout


def test_cli_reconstruct_parallel_matches_one_process(tmp_path):
    """`reconstruct --parallel` on 2 ranks (5 token rows: bands of 3 and 2) writes the same PSNR line as
    the single-process command (same decoded frames, up to the video codec's determinism)."""
    pytest.importorskip("av", reason="PyAV (the [video] extra) is not installed")
    import subprocess
    import sys

    import leanvae
    from leanvae.video import write_video

    import numpy as np

    t, h, w = np.arange(9)[:, None, None, None], np.arange(40)[None, :, None, None], np.arange(16)[None, None, :, None]
    clip = (127 + 100 * np.sin(0.3 * w + 0.2 * h + 0.5 * t + np.arange(3))).astype(np.uint8)
    src = tmp_path / "in.mp4"
    write_video(str(src), clip, fps=8)
    ckpt = tmp_path / "c.ckpt"
    torch.manual_seed(0)
    leanvae.LeanVAE.from_config(l_dim=8, h_dim=8, embedding_dim=16, sep_num_layer=1, fusion_num_layer=1,
                                ista_iter_num=1, ista_layer_num=1).save_checkpoint(str(ckpt))
    root = ROOT
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    psnr = {}
    for label, launcher in (("one", [sys.executable, "-m", "leanvae"]),
                            ("par", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                     f"--master_port={_free_port()}", "-m", "leanvae"])):
        extra = ["--parallel"] if label == "par" else []
        proc = subprocess.run(launcher + ["reconstruct", str(src), str(tmp_path / f"{label}.mp4"), "--checkpoint",
                                          str(ckpt)] + extra, capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S, cwd=root, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        lines = [ln for ln in proc.stdout.splitlines() if "PSNR" in ln]
        assert len(lines) == 1, proc.stdout  # only rank 0 reports
        psnr[label] = lines[0].split("PSNR ")[1].split(" dB")[0]
    assert psnr["par"] == psnr["one"]
