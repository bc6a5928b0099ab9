"""A hand-made Hugging Face Hub cache holding stand-ins for the published checkpoints, for offline tests.

huggingface_hub's cache layout (what `hf_hub_download` reads with `local_files_only=True`):

    <cache>/models--<owner>--<repo>/refs/<branch>            the commit hash the branch points to
    <cache>/models--<owner>--<repo>/snapshots/<hash>/<file>  the file at that commit

The stand-in checkpoints are in the published format `{"args": {...}, "state_dict": {...}}` with the
published configuration (the model's defaults, latent_dim 4 or 16) and random weights. To keep them small
(the real ones are 160 MB), every tensor is a stride-0 view of one random row, so torch.save stores only
that row; loaded, each tensor has its parameter's shape and random (row-repeated) values.
"""
import functools
import json
import os

import torch

import leanvae

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@functools.lru_cache(maxsize=None)
def _shapes(latent_dim):
    # The published model's keys and shapes, recorded in tests/data (test_reference_model checks ours equal them).
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "published_default_keys.json")) as f:
        keys = json.load(f)["state_dict"][f"latent_dim={latent_dim}"]
    return tuple((k, tuple(shape)) for k, shape in keys)


def small_published_state(latent_dim, seed=0):
    """A state_dict with the keys and shapes of LeanVAE(latent_dim) and random values in a tiny file."""
    shapes = dict(_shapes(latent_dim))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        last = shape[-1] if shape else 1
        row = torch.rand(last, generator=g) * 0.2 - 0.1
        state[k] = row.as_strided(shape, (0,) * (len(shape) - 1) + (1,)) if shape else row[0].clone()
    return state


def write_checkpoint(path, latent_dim=4, seed=0, **extra_args):
    args = {**vars(leanvae.make_args(latent_dim=latent_dim)), **extra_args}
    torch.save({"args": args, "state_dict": small_published_state(latent_dim, seed)}, path)
    return path


def populate(cache_dir, repo="Yumic/LeanVAE", files=(("LeanVAE-dim4.ckpt", 4), ("LeanVAE-dim16.ckpt", 16)),
             commit=COMMIT, branch="main"):
    """Write `files` [(name, latent_dim)] into `cache_dir` as the Hub would have; returns the snapshot folder."""
    owner, name = repo.split("/")
    root = os.path.join(cache_dir, f"models--{owner}--{name}")
    snapshot = os.path.join(root, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", branch), "w") as f:
        f.write(commit)
    for filename, latent_dim in files:
        write_checkpoint(os.path.join(snapshot, filename), latent_dim=latent_dim, seed=latent_dim)
    return snapshot
