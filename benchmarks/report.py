"""Turn pytest-benchmark JSON (and optional `python -m leanvae bench --json` files) into a dated results
file: a markdown table per benchmark case with every provider's median time, speedup over the reference,
peak memory and bandwidth, plus an SVG bar chart of the speedups.

    python benchmarks/report.py OUT_PREFIX bench.json [e2e.json ...]
writes OUT_PREFIX.md and OUT_PREFIX.svg.
"""
import json
import os
import re
import subprocess
import sys
from collections import OrderedDict


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
    env["commit"] = _git_commit()
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
    lines, chart = [], []
    for path in paths:
        with open(path) as f:
            rep = json.load(f)
        s = rep["setup"]
        lines.append(f"\n### encode+decode {s['batch']}x{s['frames']}x{s['height']}x{s['width']} {s['dtype']} "
                     f"({s['device']}, backend {s['backend']}, tile {s['tile']})\n")
        lines.append("| variant | encode s | decode s | total s | vs reference | enc peak MB | dec peak MB | rel err z | rel err x |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, r in rep["results"].items():
            err = r.get("error")
            ez = f"{err['encode']['max_rel']:.1e}" if err else "-"
            ex = f"{err['decode']['max_rel']:.1e}" if err else "-"
            lines.append(
                f"| {name} | {r['encode']['seconds']:.3f} | {r['decode']['seconds']:.3f} | {r['total_seconds']:.3f} | "
                f"{r['speedup_vs_reference']:.2f}x | {r['encode']['peak_bytes'] / 2**20:.0f} | "
                f"{r['decode']['peak_bytes'] / 2**20:.0f} | {ez} | {ex} |"
            )
            if name != "reference":
                chart.append((f"e2e {s['dtype']} {name}", r["speedup_vs_reference"]))
        lines.append(f"\nfused agrees with reference ({rep['criterion']}): {'yes' if rep['agree'] else 'NO'}")
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
