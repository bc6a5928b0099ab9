"""Finding and loading LeanVAE checkpoints, and parsing device names: one implementation for the API and the CLI.

    path = resolve_checkpoint("leanvae-4ch")          # a local path to the published 4-channel checkpoint
    model = load_model("leanvae-4ch", device="cuda")  # LeanVAE in eval() mode, weights loaded strictly
    device = parse_device("cuda:1")                   # torch.device, or ValueError saying what exists

A checkpoint may be named by a local file, a local folder holding exactly one `.ckpt`/`.pt` file, a file
in a Hugging Face Hub repository (`"owner/repo/file.ckpt"`, optionally prefixed `hf://`) or a short name
from `SHORT_NAMES`. Hub files are fetched once through `huggingface_hub` into its cache (the `hub` extra);
`HF_HUB_OFFLINE=1` or `local_files_only=True` use the cache only. Every failure is a `CheckpointError`
(a `ValueError`) whose message is one line naming the file and the fix.
"""
import argparse
import os
import warnings
from collections.abc import Mapping

import torch

from .model import DEFAULT_ARGS, LeanVAE

#: The published checkpoints (linked from the published LeanVAE README), by short name: (Hub repo, file).
SHORT_NAMES = {
    "leanvae-4ch": ("Yumic/LeanVAE", "LeanVAE-dim4.ckpt"),
    "leanvae-16ch": ("Yumic/LeanVAE", "LeanVAE-dim16.ckpt"),
}

#: The extra that installs huggingface_hub.
HUB_EXTRA = "hub"

_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
_TRUE = {"1", "true", "yes", "on"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, downloaded, read or loaded. The message is one line: file and fix."""


# ------------------------------------------------------------------------------------------- resolving
def _hub_offline():
    # huggingface_hub reads HF_HUB_OFFLINE once, when it is imported; read it again at call time so that
    # setting it later in the process (or in a test) is honoured too.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _split_hub_name(text):
    """'owner/repo/sub/file.ckpt' (or with 'hf://') -> ('owner/repo', 'sub/file.ckpt'), else None."""
    if text.startswith("hf://"):
        text = text[len("hf://"):]
    elif text.startswith(("/", "./", "../", "~")) or "\\" in text:
        return None
    parts = text.split("/")
    if len(parts) < 3 or not all(parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def _short_names_text():
    return ", ".join(f"{k} ({repo}/{f})" for k, (repo, f) in SHORT_NAMES.items())


def _checkpoint_in_folder(folder):
    found = sorted(
        name for name in os.listdir(folder)
        if name.endswith(_CHECKPOINT_SUFFIXES) and os.path.isfile(os.path.join(folder, name))
    )
    if len(found) == 1:
        return os.path.join(folder, found[0])
    if not found:
        raise CheckpointError(
            f"checkpoint folder {folder!r} holds no {'/'.join(_CHECKPOINT_SUFFIXES)} file; pass the checkpoint file itself"
        )
    raise CheckpointError(
        f"checkpoint folder {folder!r} holds {len(found)} checkpoint files ({', '.join(found[:4])}"
        f"{', ...' if len(found) > 4 else ''}); pass the one you want as a file path"
    )


def _download_instructions(repo, filename, revision):
    rev = f" --revision {revision}" if revision else ""
    return (f"download it once with network access (unset HF_HUB_OFFLINE), e.g. `hf download {repo} {filename}{rev}`, "
            f"or fetch https://huggingface.co/{repo}/resolve/{revision or 'main'}/{filename} and pass its local path")


def _hub_download(text, repo, filename, revision, cache_dir, local_files_only):
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise CheckpointError(
            f"checkpoint {text!r} is a Hugging Face Hub file ({repo}/{filename}) but huggingface_hub is not installed; "
            f"pip install 'leanvae-kernels[{HUB_EXTRA}]' (or huggingface_hub), or download the file and pass its path"
        ) from None
    offline = bool(local_files_only) or _hub_offline()
    if cache_dir is None and os.environ.get("HF_HUB_CACHE"):
        cache_dir = os.environ["HF_HUB_CACHE"]  # also read at call time, like HF_HUB_OFFLINE above
    hub_name = f"{repo}/{filename}" + (f" at revision {revision}" if revision else "")
    where = repr(text) if text in (hub_name, "hf://" + hub_name) else f"{text!r} ({hub_name})"
    try:
        return hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        if offline:
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            raise CheckpointError(
                f"checkpoint {where} is not in the Hugging Face cache"
                f"{' ' + repr(str(cache_dir)) if cache_dir else ''} and {why}; {_download_instructions(repo, filename, revision)}"
            ) from None
        raise CheckpointError(
            f"checkpoint {where} could not be downloaded (no connection to the Hub?) and is not cached; "
            f"{_download_instructions(repo, filename, revision)}"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise CheckpointError(f"checkpoint {text!r}: no Hub repository {repo!r} (or it is private: log in with `hf auth login`); "
                              f"check the name, or use one of {_short_names_text()}") from None
    except hub_errors.RevisionNotFoundError:
        raise CheckpointError(f"checkpoint {text!r}: Hub repository {repo!r} has no revision {revision!r}; "
                              "pass an existing branch, tag or commit") from None
    except hub_errors.EntryNotFoundError:
        raise CheckpointError(f"checkpoint {text!r}: Hub repository {repo!r} has no file {filename!r}"
                              f"{' at revision ' + repr(revision) if revision else ''}; check the file name") from None
    except hub_errors.HFValidationError as exc:
        raise CheckpointError(f"checkpoint {text!r} is not a valid Hub name ({str(exc).splitlines()[0]}); "
                              "expected owner/repo/file.ckpt") from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {where} could not be downloaded ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"{_download_instructions(repo, filename, revision)}"
        ) from None


def resolve_checkpoint(name_or_path, *, revision=None, cache_dir=None, local_files_only=False):
    """A local path to the checkpoint named by `name_or_path`.

    `name_or_path`: a local file; a local folder holding exactly one .ckpt/.pt/.pth file; a Hub file
    `"owner/repo/file.ckpt"` (or `"hf://owner/repo/file.ckpt"`); or a short name from `SHORT_NAMES`.
    Hub files are downloaded once into huggingface_hub's cache (`cache_dir`, else `HF_HUB_CACHE`, else its
    default); with `local_files_only=True` or `HF_HUB_OFFLINE=1` only the cache is used. `revision`: a
    branch, tag or commit of the Hub repository (ignored for local paths).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path, a Hub file or a short name (str), got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise CheckpointError(f"checkpoint name is empty; pass a file, a folder, owner/repo/file.ckpt or one of {_short_names_text()}")
    local = os.path.expanduser(text)
    if os.path.isfile(local):
        return local
    if os.path.isdir(local):
        return _checkpoint_in_folder(local)
    if text in SHORT_NAMES:
        repo, filename = SHORT_NAMES[text]
        return _hub_download(text, repo, filename, revision, cache_dir, local_files_only)
    hub = _split_hub_name(text)
    # 'some/dir/file.ckpt' whose first part is a local folder is a missing local file, not a Hub name.
    if hub is not None and not (not text.startswith("hf://") and os.path.isdir(text.split("/")[0])):
        return _hub_download(text, hub[0], hub[1], revision, cache_dir, local_files_only)
    raise CheckpointError(
        f"checkpoint {text!r} not found: it is not a local file or folder, a Hub file owner/repo/file.ckpt, "
        f"or a short name ({_short_names_text()})"
    )


# -------------------------------------------------------------------------------------------- devices
def _devices_present():
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def parse_device(text, option="device"):
    """A `torch.device` for `text` ('cpu', 'cuda', 'cuda:N', 'mps', a torch.device, or None/'auto').

    None or 'auto' -> cuda if torch sees a GPU, else cpu. A device that is not a device, or that this
    machine or this torch build does not have, is a one-line `ValueError` naming `option` and listing
    the devices that exist.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(text, torch.device):
        device = text
    elif isinstance(text, str):
        try:
            device = torch.device(text.strip())
        except (RuntimeError, ValueError):
            raise ValueError(f"{option}: {text!r} is not a device; expected cpu, cuda or cuda:N "
                             f"(this machine has: {', '.join(_devices_present())})") from None
    else:
        raise TypeError(f"{option}: expected a device name like 'cpu' or 'cuda:0' or a torch.device, got {type(text).__name__}")
    present = ", ".join(_devices_present())
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else \
                f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
            raise ValueError(f"{option}: {str(device)!r} is not available: {build}; this machine has: {present}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option}: {str(device)!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s); "
                             f"this machine has: {present}")
        return device
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{option}: 'mps' is not available on this machine; it has: {present}")
        return device
    raise ValueError(f"{option}: {str(device)!r} is not supported; expected cpu, cuda or cuda:N (this machine has: {present})")


# -------------------------------------------------------------------------------------------- loading
def read_checkpoint(path):
    """Read a published-format checkpoint file into `(args dict, state_dict or None)`, on the CPU.

    Only tensors, containers and `argparse.Namespace` are unpickled (torch's `weights_only` loader), so
    reading a file cannot run code from it.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except Exception as exc:  # unpickling, zip or format errors: torch's own text runs to many lines
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({exc.__class__.__name__}); expected a file written by "
            "torch.save({'args': ..., 'state_dict': ...}) such as the published LeanVAE-dim4.ckpt"
        ) from None
    if not isinstance(checkpoint, Mapping) or "args" not in checkpoint:
        keys = f" with keys {sorted(map(str, checkpoint))[:6]}" if isinstance(checkpoint, Mapping) else ""
        raise CheckpointError(f"{path} is not a LeanVAE checkpoint: expected a dict with 'args' and 'state_dict', "
                              f"got {type(checkpoint).__name__}{keys}")
    args = checkpoint["args"]
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        raise CheckpointError(f"{path}: 'args' must be a dict of model options, got {type(args).__name__}")
    state = checkpoint.get("state_dict")
    if state is not None and not (isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path}: 'state_dict' must map parameter names to tensors, got {type(state).__name__}")
    return dict(args), state


def _names(keys, n=3):
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def state_dict_mismatch(model, state):
    """One-line summary of how `state` fails to fit `model` (missing, unexpected, mis-shaped keys), or ''."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if shaped:
        k = shaped[0]
        parts.append(f"{len(shaped)} of the wrong shape ({k}: checkpoint {tuple(state[k].shape)}, "
                     f"model {tuple(own[k].shape)}{', ...' if len(shaped) > 1 else ''})")
    return "; ".join(parts)


def model_from_checkpoint(path, *, strict=True, where=None, model_cls=None):
    """Build a `model_cls` (default LeanVAE; on the CPU) from the checkpoint file `path`; see `load_model`."""
    where = where or path
    args, state = read_checkpoint(path)
    try:
        model = (model_cls or LeanVAE)(argparse.Namespace(**{**DEFAULT_ARGS, **args}))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: its 'args' do not build a LeanVAE ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); is it a LeanVAE checkpoint?") from None
    if state is None:
        if strict:
            raise CheckpointError(f"{where} has 'args' but no 'state_dict': it holds no weights; pass a trained "
                                  "checkpoint (in Python, strict=False gives a randomly initialised model)")
        warnings.warn(f"{where} has no 'state_dict': the model keeps its random initial weights", stacklevel=3)
        return model
    problem = state_dict_mismatch(model, state)
    if problem:
        summary = f"{where} does not fit LeanVAE(latent_dim={model.args.latent_dim}): {problem}"
        if strict:
            raise CheckpointError(summary + "; pass the checkpoint made for this model (in Python, strict=False "
                                  "loads only the tensors that fit)")
        warnings.warn(summary + "; loaded only the tensors that fit (strict=False)", stacklevel=3)
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(state, strict=not problem)
    return model


def load_model(name_or_path, *, device="cpu", strict=True, revision=None, cache_dir=None, local_files_only=False,
               model_cls=None):
    """A LeanVAE in eval() mode with the weights of the checkpoint `name_or_path`, on `device`.

    `name_or_path`: see `resolve_checkpoint` (a file, a folder, "owner/repo/file.ckpt", "leanvae-4ch",
    "leanvae-16ch"). `strict=True`: a checkpoint without weights, or whose tensors do not match the model
    its `args` describe (missing, unexpected or mis-shaped keys), is a `CheckpointError` summarising the
    difference in one line; `strict=False` loads what fits and warns with the same summary.
    `device`: see `parse_device` (None: cuda if available, else cpu). `model_cls`: a LeanVAE subclass to
    build instead (same modules and keys).
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {type(strict).__name__}")
    dev = parse_device(device)  # before any download: a bad device fails at once
    path = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    text = os.fspath(name_or_path)
    where = path if text == path else f"{text} ({path})"
    model = model_from_checkpoint(path, strict=strict, where=where, model_cls=model_cls)
    return model.to(dev).eval()
