"""Turn pytest-benchmark JSON (and optional `python -m leanvae bench --json` files) into a dated results
file: a markdown table per benchmark case with every provider's median time, speedup over the reference,
peak memory and bandwidth, plus an SVG bar chart of the speedups.

    python benchmarks/report.py OUT_PREFIX bench.json [e2e.json ...]
writes OUT_PREFIX.md and OUT_PREFIX.svg.

    python benchmarks/report.py --env PREFIX-env.json     (gpu_suite.sh's build stage: device, versions, commit)
    python benchmarks/report.py --run PREFIX              (gpu_suite.sh's report stage)
turns one run of benchmarks/gpu_suite.sh (the files PREFIX-*) into PREFIX-report.md: the README's results
table first, every figure the run did not produce written "not measured", then the stage summary, the
GPU test counts and the full tables; plus PREFIX-report.svg when there is anything to plot.
"""
import glob
import json
import os
import re
import xml.etree.ElementTree as ET
import subprocess
import sys
from collections import OrderedDict

# Run as a script, this checkout's packages come first (not another installed copy of leanvae).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _git_commit():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        code = ["leanvae", "leanvae_kernels", "csrc", "setup.py", "benchmarks/harness.py", "benchmarks/conftest.py"]
        code += [os.path.join("benchmarks", f) for f in os.listdir(os.path.dirname(__file__) or ".") if f.startswith("test_")]
        # Only the code counts: results and docs written after a run do not make it "uncommitted".
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *code],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+uncommitted" if dirty else "")
    except Exception:
        return "unknown"


def environment():
    import platform

    import torch

    env = OrderedDict(python=platform.python_version(), torch=torch.__version__)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "not installed"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda (torch)"] = torch.version.cuda
        env["driver/runtime"] = _cuda_runtime()
    else:
        env["device"] = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    # The device machine gets a copy of the working tree, maybe without .git: the caller names the commit.
    env["commit"] = os.environ.get("GPU_SUITE_COMMIT") or _git_commit()
    return env


def _cuda_runtime():
    try:
        from leanvae_kernels import _native

        return _native.build_info("cuda")[1]
    except Exception as exc:
        return f"unknown ({exc})"


def _case(bench):
    """Group key: the test name with the provider parameter removed."""
    name = bench["name"]
    provider = bench.get("extra_info", {}).get("provider", "")
    m = re.match(r"(.*?)\[(.*)\]$", name)
    if not m:
        return name, provider
    params = [p for p in m.group(2).split("-") if p != provider]
    return f"{m.group(1)}[{'-'.join(params)}]", provider


def bench_tables(paths):
    cases = OrderedDict()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            key, provider = _case(b)
            cases.setdefault(key, OrderedDict())[provider] = b
    lines = []
    chart = []
    for key, provs in cases.items():
        ref = provs.get("reference")
        ref_t = ref["stats"]["median"] if ref else None
        lines.append(f"\n### {key}\n")
        lines.append("| provider | median ms | vs reference | peak MB | GB/s | of copy BW |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for provider, b in provs.items():
            t = b["stats"]["median"]
            info = b.get("extra_info", {})
            speed = f"{ref_t / t:.2f}x" if ref_t else "-"
            peak = f"{info['peak_mem_mb']:.0f}" if "peak_mem_mb" in info else "-"
            gbps = f"{info['gbps']:.1f}" if "gbps" in info else "-"
            frac = f"{100 * info['frac_copy_bw']:.0f}%" if "frac_copy_bw" in info else "-"
            lines.append(f"| {provider} | {1e3 * t:.3f} | {speed} | {peak} | {gbps} | {frac} |")
            if ref_t and provider != "reference":
                chart.append((f"{key} {provider}", ref_t / t))
    return lines, chart


def e2e_tables(paths):
    from leanvae.bench import REPORT_COLUMNS, error_note, report_rows

    lines, chart = [], []
    for path in paths:
        with open(path) as f:
            rep = json.load(f)
        s = rep["setup"]
        lines.append(f"\n### encode+decode {s['batch']}x{s['frames']}x{s['height']}x{s['width']} {s['dtype']} "
                     f"({s['device']}, backend {s['backend']}, tile {s['tile']})\n")
        lines.append("| " + " | ".join(REPORT_COLUMNS) + " |")
        lines.append("| --- |" + " ---: |" * (len(REPORT_COLUMNS) - 1))
        lines += ["| " + " | ".join(cells) + " |" for cells in report_rows(rep)]
        for name, r in rep["results"].items():
            if name != "reference":
                chart.append((f"e2e {s['dtype']} {name}", r["speedup_vs_reference"]))
        lines.append(f"\n{error_note(rep)}; fused agrees with reference ({rep['criterion']}): "
                     f"{'yes' if rep['agree'] else 'NO'}")
    return lines, chart


def svg_chart(bars, title):
    """A horizontal bar chart (log scale) of speedups; plain SVG, no plotting library needed."""
    import math

    width, row, left = 900, 18, 520
    height = 40 + row * len(bars)
    top = max([b[1] for b in bars] + [2.0])
    scale = (width - left - 60) / math.log10(max(top, 1.01) * 1.2)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="11">',
             f'<text x="10" y="18" font-size="13">{title}</text>']
    x1 = left
    parts.append(f'<line x1="{x1}" y1="28" x2="{x1}" y2="{height - 5}" stroke="#888"/>')
    for i, (label, v) in enumerate(bars):
        y = 30 + i * row
        w = scale * math.log10(max(v, 1e-3)) if v >= 1 else -scale * math.log10(1 / max(v, 1e-3))
        color = "#2a7" if v >= 1 else "#c44"
        xs = x1 if w >= 0 else x1 + w
        parts.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">{label[:80]}</text>')
        parts.append(f'<rect x="{xs:.1f}" y="{y + 2}" width="{abs(w):.1f}" height="{row - 5}" fill="{color}"/>')
        parts.append(f'<text x="{x1 + max(w, 0) + 4:.1f}" y="{y + 12}">{v:.2f}x</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    prefix, paths = argv[0], argv[1:]
    bench_paths = [p for p in paths if "benchmarks" in json.load(open(p))]
    e2e_paths = [p for p in paths if p not in bench_paths]
    env = environment()
    lines = [f"# leanvae-kernels results: {os.path.basename(prefix)}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines.append("\nTimes are medians; 'of copy BW' divides achieved bandwidth (each input read once, each output "
                 "written once) by the measured device copy bandwidth.")
    chart = []
    t, c = e2e_tables(e2e_paths)
    lines += t
    chart += c
    t, c = bench_tables(bench_paths)
    lines += t
    chart += c
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if chart:
        with open(prefix + ".svg", "w") as f:
            f.write(svg_chart(chart, f"speedup over the reference ({env['device']})"))
    print(f"wrote {prefix}.md" + (f" and {prefix}.svg" if chart else ""))
    return 0


NOT_MEASURED = "not measured"
# The README's headline rows: every one appears in each report, measured or not.
E2E_TARGETS = [("17x1080x1920", "bfloat16"), ("17x256x256", "bfloat16")]
OP_FILES = ("haar", "causal_conv", "ista")  # benchmarks/test_bench_<name>.py, stage bench
KERNEL_PROVIDERS = ("cuda", "triton")


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _ms(seconds):
    return f"{1e3 * seconds:.3f}"


def e2e_headline(prefix):
    rows = ["| clip | dtype | reference s | fused s | speedup | peak MB ref / fused | fused rms err vs float32 (reference's) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    files = {}
    for path in glob.glob(f"{prefix}-e2e-*.json"):
        rep = _load(path)
        if rep and "setup" in rep:
            s = rep["setup"]
            files[(f"{s['frames']}x{s['height']}x{s['width']}", s["dtype"])] = rep
    keys = E2E_TARGETS + [k for k in files if k not in E2E_TARGETS]
    for clip, dtype in keys:
        rep = files.get((clip, dtype))
        if rep is None:
            rows.append(f"| {clip} | {dtype} | " + " | ".join([NOT_MEASURED] * 5) + " |")
            continue
        res = rep["results"]
        ref, fused = res.get("reference"), res.get("fused")

        def peak(r):
            return f"{max(r['encode']['peak_bytes'], r['decode']['peak_bytes']) / 2**20:.0f}" if r else NOT_MEASURED

        err = NOT_MEASURED
        if fused and "error_vs_float32" in fused and ref and "error_vs_float32" in ref:
            mine = max(fused["error_vs_float32"][p]["rms_rel"] for p in ("encode", "decode"))
            theirs = max(ref["error_vs_float32"][p]["rms_rel"] for p in ("encode", "decode"))
            err = f"{mine:.1e} ({theirs:.1e})"
        rows.append(f"| {clip} | {dtype} | {ref['total_seconds']:.3f} | "
                    f"{fused['total_seconds']:.3f} | {fused['speedup_vs_reference']:.2f}x | {peak(ref)} / {peak(fused)} | {err} |"
                    if ref and fused else f"| {clip} | {dtype} | " + " | ".join([NOT_MEASURED] * 5) + " |")
    return rows


def ops_headline(prefix):
    rows = ["| op file | case | reference ms | " + " | ".join(f"{p} ms (vs ref, of copy BW)" for p in KERNEL_PROVIDERS) + " |",
            "| --- | --- | ---: | " + " | ".join("---:" for _ in KERNEL_PROVIDERS) + " |"]
    names = list(OP_FILES) + sorted(
        os.path.basename(p)[len(os.path.basename(prefix)) + len("-bench-"):-len(".json")]
        for p in glob.glob(f"{prefix}-bench-*.json"))
    copy_bw = None
    for name in dict.fromkeys(names):
        data = _load(f"{prefix}-bench-{name}.json")
        if not data or not data.get("benchmarks"):
            rows.append(f"| {name} | (all) | {NOT_MEASURED} | " + " | ".join([NOT_MEASURED] * len(KERNEL_PROVIDERS)) + " |")
            continue
        cases = OrderedDict()
        for b in data["benchmarks"]:
            key, provider = _case(b)
            cases.setdefault(key, {})[provider] = b
            copy_bw = b.get("extra_info", {}).get("copy_gbps", copy_bw)
        for key, provs in cases.items():
            ref = provs.get("reference")
            cells = [_ms(ref["stats"]["median"]) if ref else NOT_MEASURED]
            for p in KERNEL_PROVIDERS:
                b = provs.get(p)
                if b is None:
                    cells.append(NOT_MEASURED)
                    continue
                t, info = b["stats"]["median"], b.get("extra_info", {})
                speed = f"{ref['stats']['median'] / t:.2f}x" if ref else "-"
                frac = f"{100 * info['frac_copy_bw']:.0f}%" if "frac_copy_bw" in info else "-"
                cells.append(f"{_ms(t)} ({speed}, {frac})")
            rows.append(f"| {name} | {key} | " + " | ".join(cells) + " |")
    return rows, copy_bw


def gpu_tests_line(prefix):
    path = f"{prefix}-gpu-tests.xml"
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return f"GPU correctness (`pytest -m gpu`): {NOT_MEASURED} (no {os.path.basename(path)})"
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return (f"GPU correctness (`pytest -m gpu`): {passed} passed, {n['failures']} failed, {n['errors']} errors, "
            f"{n['skipped']} skipped of {n['tests']}")


def write_env(path):
    with open(path, "w") as f:
        json.dump(environment(), f, indent=1)
    print(f"wrote {path}")
    return 0


def run_report(prefix):
    """PREFIX-report.md (+ .svg) from the files one gpu_suite.sh run wrote."""
    env = _load(f"{prefix}-env.json")
    env_note = ""
    if env is None:
        env, env_note = environment(), " (no env file from the run: these are the machine that made this report)"
    lines = [f"# leanvae-kernels GPU suite: {os.path.basename(prefix)}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    if env_note:
        lines.append(f"- note: {env_note.strip()}")
    lines += ["", "## Results table (for the README)", "",
              "End to end, encode+decode, median of the timed rounds:", ""]
    lines += e2e_headline(prefix)
    rows, copy_bw = ops_headline(prefix)
    lines += ["", "Per op, median; 'of copy BW' is achieved bandwidth (each input read once, each output written "
              f"once) over the copy bandwidth measured in the same run: {f'{copy_bw} GB/s' if copy_bw else NOT_MEASURED}.", ""]
    lines += rows
    lines += ["", "## Run", "", gpu_tests_line(prefix), ""]
    summary = f"{prefix}-summary.txt"
    if os.path.exists(summary):
        with open(summary) as f:
            lines += ["```"] + [line.rstrip() for line in f] + ["```"]
    else:
        lines.append(f"stage summary: {NOT_MEASURED}")
    bench = sorted(glob.glob(f"{prefix}-bench-*.json") + glob.glob(f"{prefix}-compile-ops.json"))
    bench = [p for p in bench if (_load(p) or {}).get("benchmarks")]
    e2e = sorted(p for p in glob.glob(f"{prefix}-e2e-*.json") + glob.glob(f"{prefix}-compile-e2e-*.json") if _load(p))
    chart = []
    t, c = e2e_tables(e2e)
    lines += ["", "## All figures"] + t
    chart += c
    t, c = bench_tables(bench)
    lines += t
    chart += c
    with open(f"{prefix}-report.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if chart:
        with open(f"{prefix}-report.svg", "w") as f:
            f.write(svg_chart(chart, f"speedup over the reference ({env.get('device', '?')})"))
    print(f"wrote {prefix}-report.md" + (f" and {prefix}-report.svg" if chart else ""))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run":
        sys.exit(run_report(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "--env":
        sys.exit(write_env(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
