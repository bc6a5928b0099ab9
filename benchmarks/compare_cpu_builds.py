"""Two builds of the native CPU module, timed against each other in one process, call by call.

    python benchmarks/compare_cpu_builds.py OTHER_C.so [--suites haar,causal_conv,ista] [--rounds 9]

Loads this tree's leanvae_kernels._C (A) and the module file OTHER_C.so (B, e.g. a
LEANVAE_KERNELS_CPU_ARCH=native build of the same sources), runs every `cpu` case of the benchmark suites
(benchmarks/test_bench_<suite>.py, their shapes and steps), and times each case's step alternately on A
and B, the order swapped every round, so both builds see the same machine load. Prints, per case, the
fastest time of each build and their ratio A/B, and per suite the geometric mean and the median of the
ratios (the median is the figure to trust when a few cases never got a quiet round). On a
shared, noisy machine this is the comparison to quote: two separate runs of the suites differ by more
than the builds do.
"""
import argparse
import importlib.util
import inspect
import itertools
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import pytest  # noqa: E402
import torch  # noqa: E402

import leanvae_kernels as lk  # noqa: E402
from leanvae_kernels import _native  # noqa: E402


class _Capture:
    """Stands in for pytest-benchmark's fixture: keeps the step the suite would time."""

    def __init__(self):
        self.extra_info, self.stats, self.group, self.step = {}, None, "", None

    def pedantic(self, fn, **_):
        self.step = fn


def _load_other(path):
    # Another full name (same last part: the init function is PyInit__C), so it is not taken for A.
    spec = importlib.util.spec_from_file_location("leanvae_compare_other._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cases(suite):
    """(id, test function, kwargs) for every `cpu` parametrisation of benchmarks/test_bench_<suite>.py."""
    module = importlib.import_module(f"test_bench_{suite}")
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_"):
            continue
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        axes = []
        for m in marks:
            names = [n.strip() for n in m.args[0].split(",")] if isinstance(m.args[0], str) else list(m.args[0])
            values = [v.values if hasattr(v, "values") else (v,) for v in m.args[1]]
            ids = [(v.id if hasattr(v, "id") and v.id else "-".join(str(x) for x in (v.values if hasattr(v, "values") else (v,))))
                   for v in m.args[1]]
            axes.append([(dict(zip(names, vals)), i) for vals, i in zip(values, ids)])
        for combo in itertools.product(*axes):
            kwargs = {k: v for part, _ in combo for k, v in part.items()}
            if kwargs.get("provider") != "cpu":
                continue
            yield f"{name}[{'-'.join(i for _, i in combo)}]", fn, kwargs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", help="path of the other build's _C*.so")
    parser.add_argument("--suites", default="haar,causal_conv,ista")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("-k", default="", help="only cases whose id contains this")
    args = parser.parse_args()

    mod_a, reason = _native.module("cpu")
    if mod_a is None:
        sys.exit(f"this tree's CPU module is unusable: {reason}")
    mod_b = _load_other(args.other)
    current = [mod_a]
    _native.module = lambda backend: (current[0], "compare_cpu_builds") if backend == "cpu" else (None, "cpu only")
    print(f"A: {mod_a.__file__} ({mod_a.BUILD_INFO}; path {getattr(mod_a, 'cpu_path', lambda: '-')()})")
    print(f"B: {mod_b.__file__} ({mod_b.BUILD_INFO}; path {getattr(mod_b, 'cpu_path', lambda: '-')()})")
    print(f"torch threads {torch.get_num_threads()}, {args.rounds} rounds per case, min time of each build")
    for suite in args.suites.split(","):
        logs = []
        for case_id, fn, kwargs in _cases(suite):
            if args.k not in case_id:
                continue
            cap = _Capture()
            try:
                fn(benchmark=cap, **kwargs)  # builds the inputs, warms up on A, hands over its step
            except pytest.skip.Exception as exc:
                print(f"  {case_id}: skipped ({exc})")
                continue
            best = {"A": math.inf, "B": math.inf}
            with lk.use_backend("cpu"):
                for m in (mod_a, mod_b):  # warm-up of each build
                    current[0] = m
                    cap.step()
                for r in range(args.rounds):
                    order = [("A", mod_a), ("B", mod_b)] if r % 2 == 0 else [("B", mod_b), ("A", mod_a)]
                    for label, m in order:
                        current[0] = m
                        t0 = time.perf_counter()
                        cap.step()
                        best[label] = min(best[label], time.perf_counter() - t0)
            ratio = best["A"] / best["B"]
            logs.append(math.log(ratio))
            print(f"  {suite:<12} {case_id:<58} A {best['A'] * 1e3:9.3f} ms  B {best['B'] * 1e3:9.3f} ms  A/B {ratio:6.3f}",
                  flush=True)
        if logs:
            median = sorted(logs)[len(logs) // 2] if len(logs) % 2 else sum(sorted(logs)[len(logs) // 2 - 1:][:2]) / 2
            print(f"{suite}: A/B over {len(logs)} cases: geometric mean {math.exp(sum(logs) / len(logs)):.3f}, "
                  f"median {math.exp(median):.3f}", flush=True)


if __name__ == "__main__":
    main()
