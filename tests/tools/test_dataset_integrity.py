"""An encoded latent folder that detects damage: shard descriptions checked on resume (damaged or foreign
shards encoded again, by name), `leanvae verify`, decode that checks what it reads, the one-writer lock,
one-line write failures (ENOSPC by a write hook, EFBIG by a real file-size limit), real kills (SIGKILL of
one process and of a torchrun job) resumed to the same bytes, and one-line input errors.

Tiny videos (9 frames of 32x32) and a tiny random model; one clean folder is encoded once per module and
copied per test.
"""
import errno
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import leanvae

pytest.importorskip("av", reason="PyAV (the [video] extra) is not installed")
pytest.importorskip("safetensors", reason="safetensors is not installed")

from leanvae import encode as enc  # noqa: E402
from leanvae import shards  # noqa: E402
from leanvae.cli import main  # noqa: E402
from leanvae.video import write_video  # noqa: E402

TINY = dict(embedding_dim=48, l_dim=16, h_dim=32, sep_num_layer=1, fusion_num_layer=1)
OPTS = dict(frames=5, videos_per_shard=2, workers=0, quiet=True)
CLI_OPTS = ["--frames", "5", "--videos-per-shard", "2", "--workers", "0", "-q"]
from helpers import ROOT, fill_disk_on_shard_write  # noqa: E402
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _clip(frames, phase, h=32, w=32):
    t, y, x, c = np.ogrid[:frames, :h, :w, :3]
    return (127 + 100 * np.sin(0.3 * x + 0.2 * y + 0.5 * t + c + phase)).astype(np.uint8)


def _encode(inputs, out, ckpt, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every run of this file with one thread, as the subprocesses: the same bytes
    try:
        return enc.encode_dataset(inputs, out, ckpt, **{**OPTS, **kw})
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 videos, listed by a manifest in this order: v0..v3 and v5 good, v4 corrupt; 2 per shard -> 3 shards.
    `clean`: the folder of an uninterrupted run; `foreign`: the same inputs encoded with --frames 9."""
    root = tmp_path_factory.mktemp("integrity")
    vids = root / "videos"
    vids.mkdir()
    names = []
    for i in range(6):
        p = vids / f"v{i}.mp4"
        if i == 4:
            p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
        else:
            write_video(str(p), _clip(9, phase=i), fps=8)
        names.append(str(p))
    manifest = root / "list.txt"
    manifest.write_text("\n".join(names) + "\n")
    torch.manual_seed(0)
    ckpt = str(root / "tiny.ckpt")
    leanvae.LeanVAE.from_config(**TINY).save_checkpoint(ckpt)
    clean = str(root / "clean")
    _encode([str(manifest)], clean, ckpt)
    foreign = str(root / "foreign")
    _encode([str(manifest)], foreign, ckpt, frames=9)
    return dict(root=root, manifest=str(manifest), videos=names, ckpt=ckpt, clean=clean, foreign=foreign)


def _copy(data, tmp_path, name="out"):
    out = str(tmp_path / name)
    shutil.copytree(data["clean"], out)
    return out


def _files(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}


def _same_as_clean(data, out):
    a, b = _files(out), _files(data["clean"])
    assert sorted(a) == sorted(b)
    for name in a:
        if name == "meta.json":  # records the checkpoint's path, which is the same here: all of it must match
            assert json.loads(a[name]) == json.loads(b[name])
        else:
            assert a[name] == b[name], name


def _shard(out, k):
    return os.path.join(out, enc.shard_name(k))


def _verify(capsys, out):
    code = main(["verify", out])
    return code, capsys.readouterr().out


def _one_line(text):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ------------------------------------------------------------------------------ clean folder
def test_clean_folder_is_described_and_verifies(data, capsys):
    out = data["clean"]
    assert sorted(os.listdir(out)) == ["errors.jsonl", "index.jsonl", "meta.json", "shard-00000.safetensors",
                                       "shard-00001.safetensors", "shard-00002.safetensors", "shards.jsonl"]
    descs = shards.read_jsonl(os.path.join(out, "shards.jsonl"))
    index = enc.read_index(out)
    assert [d["shard"] for d in descs] == [enc.shard_name(k) for k in range(3)]
    for d in descs:
        path = os.path.join(out, d["shard"])
        assert d["bytes"] == os.path.getsize(path) and d["sha256"] == shards.file_sha256(path)
        recs = [r for r in index if r["shard"] == d["shard"]]
        assert d["tensors"] == {r["key"]: {"shape": r["latent_shape"], "dtype": "float32"} for r in recs}
    assert [d["clips"] for d in descs] == [2, 2, 1] and [d["errors"] for d in descs] == [0, 0, 1]
    assert all(r["latent_shape"] == [4, 2, 4, 4] for r in index)
    code, text = _verify(capsys, out)
    assert code == 0, text
    assert re.fullmatch(re.escape(out) + r": OK: 3 shard\(s\) \(\d+\.\d KiB, SHA-256 checked\), 5 clip\(s\), "
                        r"1 skipped input\(s\)\n", text), text


# ------------------------------------------------------------------- damage: verify, then resume repairs
def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _header_end(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _flip_data(path):
    with open(path, "r+b") as f:
        f.seek(_header_end(path) + 16)
        block = bytearray(f.read(32))
        f.seek(_header_end(path) + 16)
        f.write(bytes(b ^ 0xFF for b in block))


def _swap(out):
    a, b = _shard(out, 0), _shard(out, 1)
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)


DAMAGE = {
    "truncated_half": (lambda d, out: _truncate(_shard(out, 1), os.path.getsize(_shard(out, 1)) // 2), [1], "truncated"),
    "truncated_to_header": (lambda d, out: _truncate(_shard(out, 1), _header_end(_shard(out, 1))), [1], "truncated"),
    "one_byte_short": (lambda d, out: _truncate(_shard(out, 1), os.path.getsize(_shard(out, 1)) - 1), [1], "truncated"),
    "empty": (lambda d, out: _truncate(_shard(out, 1), 0), [1], "has 0 bytes"),
    "32_bytes_flipped": (lambda d, out: _flip_data(_shard(out, 2)), [2], "SHA-256 differs"),
    "two_swapped": (lambda d, out: _swap(out), [0, 1], "SHA-256 differs"),
    "foreign_frames9": (lambda d, out: shutil.copy(_shard(d["foreign"], 0), _shard(out, 0)), [0], "bytes, its description"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_shard_is_found_by_verify_and_reencoded_by_resume(data, tmp_path, capsys, kind):
    damage, bad, why = DAMAGE[kind]
    out = _copy(data, tmp_path)
    damage(data, out)
    code, text = _verify(capsys, out)
    assert code == 1
    damaged = [ln for ln in text.splitlines() if ln.startswith("DAMAGED:")]
    assert [ln.split()[1] for ln in damaged] == [enc.shard_name(k) + ":" for k in bad], text  # and nothing else
    assert why in text
    summary = _encode([data["manifest"]], out, data["ckpt"])
    said = capsys.readouterr().err
    for k in bad:  # the resume says which shard and why, then encodes it again
        assert f"{_shard(out, k)}: " in said and "encoding it again" in said, said
    assert why in said
    assert summary["reencoded_shards"] == len(bad) and summary["resumed_shards"] == 3 - len(bad)
    _same_as_clean(data, out)
    assert _verify(capsys, out)[0] == 0


def test_foreign_shard_with_its_own_description_is_reencoded(data, tmp_path, capsys):
    # a shard and a description both copied from the --frames 9 run: consistent with each other, but of
    # another run (the description's fingerprint), so not kept
    out = _copy(data, tmp_path)
    shutil.copy(_shard(data["foreign"], 0), _shard(out, 0))
    desc = shards.read_jsonl(os.path.join(data["foreign"], "shards.jsonl"))[0]
    with open(os.path.join(out, "shard-00000.json"), "w") as f:
        f.write(json.dumps(desc) + "\n")
    summary = _encode([data["manifest"]], out, data["ckpt"])
    assert "made by another run" in capsys.readouterr().err
    assert summary["reencoded_shards"] == 1
    _same_as_clean(data, out)


def test_unreadable_shard_is_refused_in_one_line(data, tmp_path, monkeypatch, capsys):
    out = _copy(data, tmp_path)
    target = _shard(out, 1)

    def no_permission(path, mode="r", *args, **kwargs):  # as a file the user may not read (root may read all)
        if str(path) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(shards, "open", no_permission, raising=False)
    assert main(["encode", data["manifest"], "--out", out, "--checkpoint", data["ckpt"]] + CLI_OPTS) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (f"leanvae encode: cannot read {target}: Permission denied; fix its permissions, or delete it "
                    f"so that a rerun encodes it again")


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]"], ids=["garbage", "empty", "list"])
def test_garbage_meta_json_is_rewritten_when_every_shard_is_this_runs(data, tmp_path, capsys, content):
    out = _copy(data, tmp_path)
    with open(os.path.join(out, "meta.json"), "wb") as f:
        f.write(content)
    code, text = _verify(capsys, out)
    assert code == 1 and "meta.json" in text
    _encode([data["manifest"]], out, data["ckpt"])
    line = _one_line(capsys.readouterr().err)
    assert "meta.json" in line and "rewritten" in line
    _same_as_clean(data, out)


def test_garbage_meta_json_with_a_foreign_shard_is_refused(data, tmp_path, capsys):
    out = _copy(data, tmp_path)
    with open(os.path.join(out, "meta.json"), "w") as f:
        f.write("garbage")
    # a shard copied in from the --frames 9 run, with its description: nothing says what this DIR was for
    shutil.copy(_shard(data["foreign"], 0), _shard(out, 0))
    desc = shards.read_jsonl(os.path.join(data["foreign"], "shards.jsonl"))[0]
    with open(os.path.join(out, "shard-00000.json"), "w") as f:
        f.write(json.dumps(desc) + "\n")
    assert main(["encode", data["manifest"], "--out", out, "--checkpoint", data["ckpt"]] + CLI_OPTS) == 2
    line = _one_line(capsys.readouterr().err)
    assert os.path.join(out, "meta.json") in line and "restore meta.json" in line and "--overwrite" in line
    assert open(_shard(out, 0), "rb").read() == open(_shard(data["foreign"], 0), "rb").read()  # untouched


def test_verify_checks_index_errors_and_leftovers(data, tmp_path, capsys):
    out = _copy(data, tmp_path)
    index = open(os.path.join(out, "index.jsonl")).read().splitlines()
    with open(os.path.join(out, "index.jsonl"), "w") as f:
        f.write("\n".join(index[1:]) + "\n")  # a clip's line lost
    with open(os.path.join(out, "errors.jsonl"), "w") as f:
        f.write("")  # the skipped input's line lost
    open(os.path.join(out, "shard-00001.safetensors.tmp"), "wb").write(b"partial")
    code, text = _verify(capsys, out)
    assert code == 1
    assert "DAMAGED: index.jsonl: the lines of shard-00000.safetensors differ" in text
    assert "DAMAGED: errors.jsonl differs from the errors the shards carry" in text
    assert "note: shard-00001.safetensors.tmp: an unfinished write" in text
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    shutil.rmtree(out)
    shutil.copytree(data["clean"], out)
    os.remove(os.path.join(out, "index.jsonl"))
    code, text = _verify(capsys, out)
    assert code == 1 and "index.jsonl missing: the encode run did not finish" in text


# ---------------------------------------------------------------------------------- decode
def _edit_index(out, fn):
    path = os.path.join(out, "index.jsonl")
    recs = shards.read_jsonl(path)
    fn(recs[0])
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))


def _decode(capsys, out, tmp_path, *extra):
    code = main(["decode", out, "--out", str(tmp_path / "videos"), "-q"] + list(extra))
    return code, capsys.readouterr().err


TAMPER = {
    "width": (lambda out: _edit_index(out, lambda r: r["latent_shape"].__setitem__(3, 5)), "the index says float32 [4, 2, 4, 5]"),
    "frames": (lambda out: _edit_index(out, lambda r: r.__setitem__("frames", 9)), "but 9 frames of 32x32 encode to [4, 3, 4, 4]"),
    "dtype_float16": (lambda out: _edit_index(out, lambda r: r.__setitem__("latent_dtype", "float16")), "the index says float16"),
    "dtype_int32": (lambda out: _edit_index(out, lambda r: r.__setitem__("latent_dtype", "int32")), "the index says int32"),
    "renamed_key": (lambda out: _edit_index(out, lambda r: r.__setitem__("key", "v00000000_c00009")), "key 'v00000000_c00009' is not in the shard"),
    "deleted_shard": (lambda out: os.remove(_shard(out, 0)), "the file is missing"),
    "truncated_shard": (lambda out: _truncate(_shard(out, 0), 100), "(truncated)"),
}


@pytest.mark.parametrize("kind", sorted(TAMPER))
def test_decode_checks_what_it_reads(data, tmp_path, capsys, kind):
    tamper, why = TAMPER[kind]
    out = _copy(data, tmp_path)
    tamper(out)
    code, err = _decode(capsys, out, tmp_path)
    assert code == 2
    line = _one_line(err)
    assert why in line and "shard-00000.safetensors" in line and "v00000000_c0000" in line, line
    assert not os.path.exists(tmp_path / "videos" / "v00000000_c00000.mp4")


def test_decode_without_meta_json_is_one_line(data, tmp_path, capsys):
    out = _copy(data, tmp_path)
    os.remove(os.path.join(out, "meta.json"))
    code, err = _decode(capsys, out, tmp_path)
    assert code == 2
    line = _one_line(err)
    assert os.path.join(out, "meta.json") in line and "No such file" in line
    with open(os.path.join(out, "meta.json"), "w") as f:
        f.write("{}")
    code, err = _decode(capsys, out, tmp_path, "--checkpoint", data["ckpt"])
    assert code == 2 and "format_version None" in _one_line(err)


def test_decode_of_a_clean_folder_still_works(data, tmp_path, capsys):
    code, err = _decode(capsys, data["clean"], tmp_path, "--limit", "1")
    assert code == 0, err
    assert os.listdir(tmp_path / "videos") == ["v00000000_c00000.mp4"]


# ------------------------------------------------------------------------------------ the lock
def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait(timeout=30)
    return p.pid


def _write_lock(out, **holder):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "encode.lock"), "w") as f:
        json.dump(holder, f)


def test_stale_lock_of_a_dead_process_is_taken_over(data, tmp_path):
    out = _copy(data, tmp_path)
    _write_lock(out, host=socket.gethostname(), pid=_dead_pid(), pid_start=1, started="earlier")
    summary = _encode([data["manifest"]], out, data["ckpt"])
    assert summary["resumed_shards"] == 3
    assert not os.path.exists(os.path.join(out, "encode.lock"))  # released at the end
    _same_as_clean(data, out)


def test_lock_of_a_live_process_or_another_host_is_refused(data, tmp_path, capsys):
    out = str(tmp_path / "out")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(out, host=socket.gethostname(), pid=sleeper.pid, pid_start=shards._proc_start(sleeper.pid),
                    started="2026-01-01T00:00:00")
        assert main(["encode", data["manifest"], "--out", out, "--checkpoint", data["ckpt"]] + CLI_OPTS) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"pid {sleeper.pid} on host {socket.gethostname()}" in line and "still running on this host" in line
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
    _write_lock(out, host="node-that-is-not-this-one", pid=os.getpid(), pid_start=None, started="x")
    assert main(["encode", data["manifest"], "--out", out, "--checkpoint", data["ckpt"]] + CLI_OPTS) == 2
    line = _one_line(capsys.readouterr().err)
    assert "host node-that-is-not-this-one" in line and f"delete {os.path.join(out, 'encode.lock')}" in line
    assert sorted(os.listdir(out)) == ["encode.lock"]  # refused before writing anything


def test_pid_reused_by_a_new_process_counts_as_dead(data, tmp_path):
    out = _copy(data, tmp_path)
    # this pid is alive, but started at another time than the holder's: the holder is gone, its pid reused
    _write_lock(out, host=socket.gethostname(), pid=os.getpid(), pid_start=-1, started="earlier")
    assert _encode([data["manifest"]], out, data["ckpt"])["resumed_shards"] == 3


def test_second_run_into_the_same_folder_is_refused_and_the_first_completes(data, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    real = enc._encode_shard
    refused = []

    def second_run_meanwhile(*args, **kwargs):
        if not refused:  # while the first run holds the lock, a second one starts on the same DIR
            with pytest.raises(enc.EncodeError, match="is being written by another encode") as exc:
                enc.encode_dataset([data["manifest"]], out, data["ckpt"], **OPTS)
            refused.append(str(exc.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(enc, "_encode_shard", second_run_meanwhile)
    _encode([data["manifest"]], out, data["ckpt"])
    assert len(refused) == 1 and f"pid {os.getpid()}" in refused[0] and "\n" not in refused[0]
    _same_as_clean(data, out)


# ------------------------------------------------------------------------------- write failures
def test_disk_full_while_a_shard_is_written_is_one_line_and_resumes(data, tmp_path, monkeypatch, capsys):
    fill_disk_on_shard_write(monkeypatch, shards, nth=2)  # the second shard file: half on disk, then full
    out = str(tmp_path / "out")
    assert main(["encode", data["manifest"], "--out", out, "--checkpoint", data["ckpt"]] + CLI_OPTS) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (f"leanvae encode: cannot write {_shard(out, 1)}: No space left on device; the run stopped, "
                    f"completed shards are kept and rerunning the same command resumes (once the cause is fixed)")
    # nothing that looks complete: shard 1 has neither its file nor its description; the lock is released
    assert sorted(os.listdir(out)) == ["meta.json", "shard-00000.json", "shard-00000.safetensors"]
    monkeypatch.undo()
    assert _encode([data["manifest"]], out, data["ckpt"])["resumed_shards"] == 1
    _same_as_clean(data, out)


def test_file_size_limit_is_one_line_and_resumes(data, tmp_path, capsys):
    # a real EFBIG from the kernel: RLIMIT_FSIZE below a shard's size, with SIGXFSZ ignored (else the process
    # is killed), set in this process around one in-process run (workers=0: no other process writes)
    out = str(tmp_path / "out")
    limit = min(os.path.getsize(_shard(data["clean"], k)) for k in range(3)) - 1
    assert os.path.getsize(os.path.join(data["clean"], "meta.json")) < limit  # meta.json itself fits
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code = main(["encode", data["manifest"], "--out", out, "--checkpoint", data["ckpt"]] + CLI_OPTS)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"leanvae encode: cannot write {_shard(out, 0)}: File too large; the run stopped"), line
    assert sorted(os.listdir(out)) == ["meta.json"]  # no shard, no description, no temporary file, no lock
    _encode([data["manifest"]], out, data["ckpt"])
    _same_as_clean(data, out)


# ---------------------------------------------------------------------------------- real kills
def _fifo_manifest(data, tmp_path, slot):
    """A manifest of the inputs with input `slot` replaced by a named pipe: a run reading it blocks there
    (after the shards before it are complete) until the test kills it. Returns (manifest, fifo path)."""
    fifo = str(tmp_path / f"slot{slot}.mp4")
    os.mkfifo(fifo)
    videos = list(data["videos"])
    videos[slot] = fifo
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(videos) + "\n")
    return str(manifest), fifo, data["videos"][slot]


def _wait_for(paths, proc, timeout=90):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never wrote " + ", ".join(paths)
        time.sleep(0.05)


def _clean_of(data, tmp_path, manifest):
    """The folder an uninterrupted run of `manifest` writes (its inputs differ from data['clean']'s by path)."""
    out = str(tmp_path / "lone")
    _encode([manifest], out, data["ckpt"])
    return out


def _process_tree(pid):
    """pid and all its descendants (torchrun's agent starts its ranks in sessions of their own, so killing
    the agent's process group would miss them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


class _Forked:
    """`python -m leanvae encode` run in a fork of this process (no interpreter start-up, unlike a
    subprocess: about 8 s less on the 2-core VM), as the Popen-like object `_wait_for` polls."""

    def __init__(self, argv):
        import multiprocessing

        self.p = multiprocessing.get_context("fork").Process(target=self._main, args=(argv,))
        self.p.start()
        self.pid = self.p.pid

    @staticmethod
    def _main(argv):
        torch.set_num_threads(1)  # no OpenMP pool in the child of a fork
        os._exit(main(argv))

    def poll(self):
        return self.p.exitcode

    def communicate(self, timeout=None):
        self.p.join(timeout)
        return "", f"exit code {self.p.exitcode}"


def _kill_and_resume(data, tmp_path, cmd, slot, complete):
    manifest, fifo, real = _fifo_manifest(data, tmp_path, slot)
    out = str(tmp_path / "out")
    argv = cmd(manifest, out)
    if argv[0] == "leanvae":
        proc = _Forked(argv[1:])
    else:
        proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        _wait_for([_shard(out, k) for k in complete], proc)
    finally:
        for p in _process_tree(proc.pid):  # the whole tree at once: torchrun's agent and its ranks
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate(timeout=60)
    assert os.path.exists(os.path.join(out, "encode.lock"))  # left by the dead writer
    os.remove(fifo)
    shutil.copy(real, fifo)  # the same path now holds the video
    summary = _encode([manifest], out, data["ckpt"])  # the dead holder's lock is taken over
    assert summary["resumed_shards"] == len(complete) and summary["reencoded_shards"] == 0
    lone = _clean_of(data, tmp_path, manifest)
    assert sorted(os.listdir(out)) == sorted(os.listdir(lone))
    for name in os.listdir(out):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(lone, name), "rb").read(), name


def test_sigkill_of_one_process_resumes_to_the_same_bytes(data, tmp_path):
    def cmd(manifest, out):
        return ["leanvae", "encode", manifest, "--out", out, "--checkpoint", data["ckpt"]] + CLI_OPTS

    _kill_and_resume(data, tmp_path, cmd, slot=2, complete=[0])


def test_sigkill_of_a_torchrun_job_resumes_to_the_same_bytes(data, tmp_path):
    # rank 0 writes shards 0 and 2, rank 1 shard 1: rank 0 blocks on the pipe in shard 2 (rank 1 waits for it)
    def cmd(manifest, out):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "leanvae",
                "encode", manifest, "--out", out, "--checkpoint", data["ckpt"]] + CLI_OPTS

    _kill_and_resume(data, tmp_path, cmd, slot=5, complete=[0, 1])


# -------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("fps", ["inf", "nan", "-1", "1e9"])
def test_absurd_fps_is_one_line(data, tmp_path, capsys, fps):
    assert main(["encode", data["manifest"], "--out", str(tmp_path / "o"), "--checkpoint", data["ckpt"], "--fps", fps]) == 2
    assert "fps must be a finite number in (0, 1000.0]" in _one_line(capsys.readouterr().err)


def test_undecodable_manifest_is_named(data, tmp_path, capsys):
    manifest = tmp_path / "latin1.txt"
    manifest.write_bytes("vid\xe9o.mp4\n".encode("latin-1"))
    assert main(["encode", str(manifest), "--out", str(tmp_path / "o"), "--checkpoint", data["ckpt"]]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"manifest {manifest} is not UTF-8 text" in line


def test_checkpoint_without_weights_is_refused_before_the_folder_is_touched(data, tmp_path, capsys):
    ckpt = torch.load(data["ckpt"], weights_only=True)
    no_weights = str(tmp_path / "args_only.ckpt")
    torch.save({"args": ckpt["args"]}, no_weights)
    out = str(tmp_path / "o")
    assert main(["encode", data["manifest"], "--out", out, "--checkpoint", no_weights]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{no_weights} has 'args' but no 'state_dict'" in line
    assert not os.path.exists(out)


def test_state_dict_that_does_not_fit_is_summarised_in_one_line(data, tmp_path, capsys):
    ckpt = torch.load(data["ckpt"], weights_only=True)
    ckpt["args"] = {**ckpt["args"], "latent_dim": 16}  # the weights are of a 4-channel model
    wrong = str(tmp_path / "wrong.ckpt")
    torch.save(ckpt, wrong)
    assert main(["encode", data["manifest"], "--out", str(tmp_path / "o"), "--checkpoint", wrong]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{wrong} does not fit LeanVAE(latent_dim=16)" in line and "of the wrong shape" in line


@pytest.mark.parametrize("device,said", [("bogus", "'bogus' is not a device"), ("cuda", "'cuda' is not available")])
def test_unknown_or_unavailable_device_is_one_line(data, tmp_path, capsys, device, said):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is available")
    for cmd in (["encode", data["manifest"], "--out", str(tmp_path / "o"), "--checkpoint", data["ckpt"]],
                ["decode", data["clean"], "--out", str(tmp_path / "v")]):
        assert main(cmd + ["--device", device]) == 2
        assert said in _one_line(capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "o")


def test_decode_with_another_checkpoint_is_refused(data, tmp_path, capsys):
    torch.manual_seed(1)
    other = str(tmp_path / "other.ckpt")
    leanvae.LeanVAE.from_config(**TINY).save_checkpoint(other)
    code, err = _decode(capsys, data["clean"], tmp_path, "--checkpoint", other)
    assert code == 2
    assert "is not the checkpoint these latents were made with" in _one_line(err)


@pytest.mark.parametrize("args,said", [
    (["--size", "100000x64"], "size must be (H, W), positive multiples of 8 up to 16384"),
    (["--stride", "0"], "stride must be a positive int, got 0"),
    (["--max-clips-per-video", "-2"], "max_clips_per_video must be a positive int, got -2"),
])
def test_absurd_numbers_are_one_line(data, tmp_path, capsys, args, said):
    assert main(["encode", data["manifest"], "--out", str(tmp_path / "o"), "--checkpoint", data["ckpt"]] + args) == 2
    assert said in _one_line(capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "o")
