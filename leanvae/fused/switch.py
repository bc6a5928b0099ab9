"""`use_fused_kernels`: switch a LeanVAE (ours or the published code) to the fused kernels, revertibly.

Modules are recognised by structure (parameters, buffers, attribute names and shapes), not only by class,
so an instance of the published LeanVAE code, which this package cannot import, is switched too. A
recognised module gets an instance-level method (`forward`, or `recon` for the bottleneck) that calls the
fused ops with the module's own parameters; nothing else changes: parameters stay where they are, so
`state_dict` keys, `repr` and checkpoints are untouched. With no model, the methods are set on our
reference classes instead, so every LeanVAE built from them, existing or future, is switched.
Nothing inside torch is rebound.

Semantics (README, "Use it"):
- Layers. Every switch is a layer on each (module or class, method) it replaces; the newest active layer
  is what runs, so a second call on a switched model re-binds it with the new backend/groups. `revert()`
  of any handle, in any order, removes only that handle's layers; when a method has no layer left, the
  original is restored exactly (the same function object, no leftover instance attribute). Instance and
  class switches are independent layers (an instance's own layer wins over its class's).
- Pickling. A switched instance saves as the plain model: `torch.save`, `pickle` and `copy.deepcopy` store
  it without the fused methods (a switch is a property of this process, like a hook), so the file loads
  anywhere, with or without this package; switch the loaded model again if wanted. (A class-level switch
  applies to every instance of the class in this process, loaded ones included.)
- Overrides. A module whose class defines its own `forward` (or `recon`) under a name we do not know, e.g.
  a user subclass of PEG3D, is left alone, and its NAF parent calls it rather than inlining the fused
  conv; the handle lists it under `skipped` with the reason.
- A model in which no module is recognised raises ValueError (switching nothing silently hides a mistake).
"""
import functools
import types
import weakref

import torch
import torch.nn as nn

from leanvae_kernels import _backend

# ------------------------------------------------------------------------------ structural matchers
# Published and reference modules share these names and shapes; classes may differ.


def _attrs(m, *names):
    return all(hasattr(m, n) for n in names)


def is_patcher(m):
    return _attrs(m, "wavelets", "_arange", "rescale", "_2ddwt", "_3ddwt") and tuple(m.wavelets.shape) == (2,)


def is_unpatcher(m):
    return _attrs(m, "wavelets", "_arange", "rescale", "_2didwt", "_3didwt") and tuple(m.wavelets.shape) == (2,)


def is_peg3d(m):
    conv = getattr(m, "ds_conv", None)
    return (
        isinstance(conv, nn.Conv3d)
        and _attrs(m, "tile_inference", "is_first_chunk", "causal_cached")
        and tuple(conv.kernel_size) == (3, 3, 3)
        and conv.groups == conv.in_channels == conv.out_channels
        and tuple(conv.stride) == (1, 1, 1)
        and tuple(conv.padding) == (0, 0, 0)
        and tuple(conv.dilation) == (1, 1, 1)
        and conv.padding_mode == "zeros"
    )


def _is_naf_like(m):
    return (
        _attrs(m, "num_layer", "dconv_layer", "ffd_layer")
        and len(m.dconv_layer) == len(m.ffd_layer) == m.num_layer
        and all(is_peg3d(p) for p in m.dconv_layer)
    )


# NAF and ResNAF have identical structure; only their forward differs (ResNAF adds residuals), so the
# class name decides. An unknown NAF-like class is left alone (its PEG3D children are still switched).
def is_naf(m):
    return type(m).__name__ == "NAF" and _is_naf_like(m)


def is_resnaf(m):
    return type(m).__name__ == "ResNAF" and _is_naf_like(m)


def is_ista(m):
    return (
        _attrs(m, "phi", "Q", "weights", "threshold", "forward_l", "backward_l", "iter_num", "sample", "recon")
        and isinstance(m.phi, nn.Parameter)
        and m.phi.ndim == 2
        and tuple(m.Q.shape) == tuple(m.phi.shape[::-1])
        and len(m.weights) == len(m.threshold) == len(m.forward_l) == len(m.backward_l) == m.iter_num
    )


# ---------------------------------------------------------------------------------- what replaces what
def _when(group):
    return lambda on: {} if on[group] else None


def _naf_flags(on):
    """NAF/ResNAF forwards serve two groups: the fused conv and the padded-GEMM feed-forward."""
    return {"conv": on["conv"], "ffd": on["ffd"]} if on["conv"] or on["ffd"] else None


# (matcher, method, "module:function" of the fused implementation, op it needs or None, flags(on) -> the
# keyword arguments to bind, or None when the entry is off for the groups switched on)
_PLAN = [
    (is_patcher, "forward", "leanvae.fused.haar:fused_patcher_forward", "haar_patch", _when("haar"), "Patcher"),
    (is_unpatcher, "forward", "leanvae.fused.haar:fused_unpatcher_forward", "haar_unpatch", _when("haar"), "UnPatcher"),
    (is_resnaf, "forward", "leanvae.fused.peg3d:fused_resnaf_forward", "causal_dwconv3d", _naf_flags, "ResNAF"),
    (is_naf, "forward", "leanvae.fused.peg3d:fused_naf_forward", "causal_dwconv3d", _naf_flags, "NAF"),
    (is_peg3d, "forward", "leanvae.fused.peg3d:fused_peg3d_forward", "causal_dwconv3d", _when("conv"), "PEG3D"),
    # sample is one matmul that already reads x once; forward calls self.recon, so recon is enough.
    (is_ista, "recon", "leanvae.fused.ista:fused_ista_recon", "ista_step", _when("ista"), "ISTA"),
]


def foreign_override(module, method, known):
    """The class that defines `module.<method>` when it is neither the known class `known` (by name: ours
    or the published one) nor one of our fused methods; None otherwise. Such a module is left alone."""
    for klass in type(module).__mro__:
        if method in vars(klass):
            fn = vars(klass)[method]
            if klass.__name__ == known or getattr(fn, "__leanvae_fused__", False):
                return None
            return klass
    return None


def _load(path):
    """The fused function at 'module:name', or None (with the reason) when it does not exist."""
    mod_name, fn_name = path.split(":")
    try:
        mod = __import__(mod_name, fromlist=[fn_name])
    except ImportError as exc:
        return None, f"{mod_name} unavailable ({exc})"
    fn = getattr(mod, fn_name, None)
    return (fn, "") if fn is not None else (None, f"{path} not found")


def _bind_backend(fn, backend, flags):
    """A plain function `(self, *args)` calling fn with a fixed backend and flags (compile-friendly)."""

    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        return fn(self, *args, backend=backend, **flags, **kwargs)

    method.__leanvae_fused__ = True
    return method


def _op_status(op_name):
    return next(op for op in _backend.ALL_OPS if op.name == op_name)


def _check_backend_can_run(backend, op_names, device, dtype):
    if backend == "auto":
        return
    for name in op_names:
        ok, reason = _op_status(name).status(backend, device.type, dtype)
        if not ok:
            raise _backend.BackendUnavailable(f"use_fused_kernels: backend {backend!r} cannot run {name}: {reason}")


class _Slot:
    """One (target, attribute) that some handle replaced: what was there first, and the layers on top."""

    def __init__(self, target, name):
        self.own = name in vars(target)
        self.original = vars(target).get(name)
        self.layers = []  # [(handle, value)], oldest first


# target (a module instance or a class) -> {attribute: _Slot}. Weak: a switched model that is dropped is
# not kept alive by the bookkeeping.
_SLOTS = weakref.WeakKeyDictionary()


def _apply(target, name, slot):
    """Make `target.<name>` what its slot says: the newest layer, else exactly the original."""
    if slot.layers:
        setattr(target, name, slot.layers[-1][1])
    elif slot.own:
        setattr(target, name, slot.original)
    elif name in vars(target):
        delattr(target, name)


def _plain_getstate(self):
    """__getstate__ of a switched instance: its state as the unswitched module's (see the module doc)."""
    state = self.__dict__.copy()
    for name, slot in _SLOTS.get(self, {}).items():
        if slot.own:
            state[name] = slot.original
        else:
            state.pop(name, None)
    return state


class FusedKernelsHandle:
    """What `use_fused_kernels` replaced, and how to take it back (`revert()`, or a `with` block)."""

    def __init__(self, backend):
        self.backend = backend
        self._held = []  # (target, attribute) of this handle's layers, in the order they were added
        self.replaced = []  # human-readable lines: "encoder.low_layer.dconv_layer.0: PEG3D.forward -> fused_peg3d_forward"
        self.skipped = []  # groups or modules not switched, with the reason

    @property
    def active(self):
        """Whether this handle still holds any layer."""
        return bool(self._held)

    def _push(self, target, name, value):
        slots = _SLOTS.setdefault(target, {})
        slot = slots.get(name)
        if slot is None:
            slot = slots[name] = _Slot(target, name)
        slot.layers.append((self, value))
        _apply(target, name, slot)
        self._held.append((target, name))

    def _set(self, target, name, value, label):
        if not isinstance(target, type) and not any(t is target for t, _ in self._held):
            # Pickle/deepcopy a switched instance as the plain module.
            self._push(target, "__getstate__", types.MethodType(_plain_getstate, target))
        self._push(target, name, value)
        self.replaced.append(label)

    def revert(self):
        """Remove this handle's layers (whatever other handles did, in whatever order); safe to call twice."""
        while self._held:
            target, name = self._held.pop()
            slots = _SLOTS.get(target, {})
            slot = slots.get(name)
            if slot is None:
                continue
            slot.layers = [layer for layer in slot.layers if layer[0] is not self]
            _apply(target, name, slot)
            if not slot.layers:
                del slots[name]
                if not slots:
                    _SLOTS.pop(target, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.revert()
        return False

    def __repr__(self):
        state = "active" if self.active else "reverted"
        lines = [f"FusedKernelsHandle(backend={self.backend!r}, {state}, {len(self.replaced)} replaced)"]
        lines += [f"  {r}" for r in self.replaced]
        lines += [f"  skipped: {s}" for s in self.skipped]
        return "\n".join(lines)


def _describe_flags(flags):
    on = [k for k, v in flags.items() if v]
    return f" ({', '.join(on)})" if flags else ""


def use_fused_kernels(model=None, *, backend="auto", haar=True, conv=True, ista=True, ffd=True):
    """Switch `model` (an nn.Module: our LeanVAE, the published one, or any module holding such parts)
    to the fused kernels; with `model=None`, switch our reference classes (every LeanVAE built from them).

    backend: "auto", "cuda", "triton", "cpu" or "reference"; an explicit backend that cannot run the
    model's ops on its device/dtype raises BackendUnavailable. haar/conv/ista: which op groups to switch;
    ffd: the feed-forward with padded GEMMs (torch's), the residual folded in and the fused GEGLU op where it can run.
    Returns a FusedKernelsHandle: `.revert()` restores exactly; `.replaced` lists what was switched.
    """
    backend = _backend._validate(backend)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"use_fused_kernels: model must be an nn.Module or None, got {type(model).__name__}")
    on = {"haar": bool(haar), "conv": bool(conv), "ista": bool(ista), "ffd": bool(ffd)}
    handle = FusedKernelsHandle(backend)
    plan = []
    for matcher, method, path, op_name, flags_of, known in _PLAN:
        flags = flags_of(on)
        if flags is None:
            continue
        fn, why = _load(path)
        if fn is None:
            handle.skipped.append(why)
            continue
        needs_op = op_name if (op_name != "causal_dwconv3d" or on["conv"]) else None
        plan.append((matcher, method, fn, needs_op, flags, known))
    if not plan:
        raise ValueError("use_fused_kernels: nothing to switch: every group (haar, conv, ista, ffd) is off")

    if model is not None:
        param = next(model.parameters(), None)
        if param is not None:
            _check_backend_can_run(backend, {p[3] for p in plan if p[3]}, param.device, param.dtype)
        recognised = 0
        for name, module in model.named_modules():
            taken = set()
            for matcher, method, fn, _, flags, known in plan:
                if method in taken or not matcher(module):
                    continue
                taken.add(method)
                recognised += 1
                where = name or "<model>"
                owner = foreign_override(module, method, known)
                if owner is not None:
                    handle.skipped.append(f"{where}: {type(module).__name__} defines its own {method} "
                                          f"({owner.__module__}.{owner.__qualname__}); left alone")
                    continue
                label = f"{where}: {type(module).__name__}.{method} -> {fn.__name__}{_describe_flags(flags)}"
                handle._set(module, method, types.MethodType(_bind_backend(fn, backend, flags), module), label)
        if not recognised:
            raise ValueError(f"use_fused_kernels: no LeanVAE module recognised in {type(model).__name__} (looked for "
                             "Patcher, UnPatcher, PEG3D, NAF, ResNAF and ISTA modules, ours or the published ones)")
        return handle

    if backend not in ("auto", "reference"):
        device = "cuda" if backend in ("cuda", "triton") else "cpu"
        ok, reason = _backend.backend_status(backend, device)
        if not ok:
            raise _backend.BackendUnavailable(f"use_fused_kernels: backend {backend!r} is not available: {reason}")
    import leanvae.modules
    import leanvae.wavelets

    classes = [leanvae.wavelets.Patcher, leanvae.wavelets.UnPatcher, leanvae.modules.PEG3D, leanvae.modules.NAF,
               leanvae.modules.ResNAF, leanvae.modules.ISTA]
    for cls in classes:
        probe = _probe_instance(cls)
        taken = set()
        for matcher, method, fn, _, flags, _known in plan:
            if method in taken or not matcher(probe):
                continue
            taken.add(method)
            label = f"{cls.__module__}.{cls.__name__}.{method} -> {fn.__name__}{_describe_flags(flags)}"
            handle._set(cls, method, _bind_backend(fn, backend, flags), label)
    return handle


@functools.lru_cache(maxsize=None)
def _probe_instance(cls):
    """A tiny instance of a reference class, to run the structural matchers on the class."""
    import leanvae.modules
    import leanvae.wavelets

    with torch.device("meta"):
        if cls in (leanvae.wavelets.Patcher, leanvae.wavelets.UnPatcher):
            return cls()
        if cls is leanvae.modules.PEG3D:
            return cls(2)
        if cls in (leanvae.modules.NAF, leanvae.modules.ResNAF):
            return cls(num_layer=1, dim=2)
        if cls is leanvae.modules.ISTA:
            return cls(points_num=4, out_num=2, iter_num=1, layer_num=1)
    raise TypeError(cls)
