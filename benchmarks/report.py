"""Render pytest-benchmark JSON into a markdown table and PNG plots.

    pytest benchmarks/ --benchmark-only --benchmark-json results.json
    python -m benchmarks.report results.json [--out benchmarks/results/cpu]

Writes <out>/report.md (one table per group: provider, throughput, ratio against the best peer
measured in the same run, ratio against the roofline when there is one) and one
<out>/<family>.png per benchmark family that sweeps a size (the group name without its size, e.g.
attention_fwd_causal_h32_d64_float32.png): throughput against sequence length (or the group's
size parameter) per provider on the left, each of our providers' ratio against the best peer on
the right.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict


def load_rows(path: str) -> tuple[list[dict], dict]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bm in data.get("benchmarks", []):
        info = bm.get("extra_info", {})
        if "throughput" not in info:
            continue
        rows.append({
            "group": bm.get("group") or bm["name"],
            "name": bm["name"],
            "provider": info["provider"],
            "ours": info["ours"],
            "roofline": info.get("roofline", False),
            "throughput": info["throughput"],
            "unit": info["unit"],
            "median_ms": bm["stats"]["median"] * 1e3,
            "ratio": info.get("ratio_vs_best_peer"),
            "ratio_roof": info.get("ratio_vs_roofline"),
            "device": info.get("device", "?"),
            "dtype": info.get("dtype", "?"),
            "shape": info.get("shape", "?"),
            "commit": info.get("commit", "?"),
        })
    return rows, data.get("machine_info", {})


def markdown(rows: list[dict], machine: dict, title: str) -> str:
    out = [f"# {title}", ""]
    if rows:
        devices = sorted({r["device"] for r in rows})
        commits = sorted({r["commit"] for r in rows})
        out += [f"Device: {', '.join(devices)}. Commit: {', '.join(commits)}.",
                f"Machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}, "
                f"python {machine.get('python_version', '?')}.",
                "Ratios compare throughputs measured in the same run (median of rounds); > 1 is faster than "
                "the best peer. `roofline` rows are yardsticks (e.g. a plain copy of the same bytes), not peers.", ""]
    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    for group, rs in groups.items():
        out += [f"## {group}", "", "| provider | kind | median (ms) | throughput | vs best peer | vs roofline |",
                "|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: -r["throughput"]):
            kind = "roofline" if r["roofline"] else ("ours" if r["ours"] else "peer")
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None and not r["roofline"] else ""
            roof = f"{r['ratio_roof']:.2f}x" if r["ratio_roof"] is not None and not r["roofline"] else ""
            out.append(f"| {r['provider']} | {kind} | {r['median_ms']:.3f} | {r['throughput']:.3f} {r['unit']} | "
                       f"{ratio} | {roof} |")
        out.append("")
    return "\n".join(out)


def _split_group(group: str) -> tuple[str, int | None, str]:
    """'rotary q+k b4 s512 h32 ...' -> ('rotary q+k b4 h32 ...', 512, 's'): the series key and its x."""
    m = re.search(r"\b(s|seqlen|n|tokens)(\d+)\b", group)
    if not m:
        return group, None, ""
    return (group[:m.start()] + group[m.end():]).replace("  ", " ").strip(), int(m.group(2)), m.group(1)


def plots(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(lambda: defaultdict(list))  # family -> provider -> [(x, row)]
    for r in rows:
        family, x, _ = _split_group(r["group"])
        if x is not None:
            series[family][r["provider"]].append((x, r))
    written = []
    for family, providers in series.items():
        slug = re.sub(r"[^A-Za-z0-9]+", "_", family).strip("_")[:60]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        unit = "?"
        colors = {p: f"C{i % 10}" for i, p in enumerate(sorted(providers))}  # same color in both panels
        for provider, pts in sorted(providers.items()):
            pts.sort(key=lambda p: p[0])
            xs = [p[0] for p in pts]
            unit = pts[0][1]["unit"]
            style = "-o" if pts[0][1]["ours"] else ("--" if pts[0][1]["roofline"] else "-s")
            ax1.plot(xs, [p[1]["throughput"] for p in pts], style, label=provider, color=colors[provider])
            if pts[0][1]["ours"] and all(p[1]["ratio"] is not None for p in pts):
                ax2.plot(xs, [p[1]["ratio"] for p in pts], "-o", label=provider, color=colors[provider])
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.grid(alpha=0.3)
        ax1.set_ylabel(unit)
        ax1.set_title(f"{family}: throughput")
        ax1.legend(fontsize=7)
        ax2.axhline(1.0, color="gray", lw=1)
        ax2.set_ylabel("ratio vs best peer (same run)")
        ax2.set_title("ours / best peer")
        if ax2.lines[1:]:
            ax2.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{slug}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Render pytest-benchmark JSON into markdown and PNG plots")
    ap.add_argument("json_path")
    ap.add_argument("--out", default=None, help="output folder (default: beside the JSON)")
    ap.add_argument("--title", default="phi-kernels benchmark results")
    args = ap.parse_args(argv)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.json_path))
    os.makedirs(out_dir, exist_ok=True)
    rows, machine = load_rows(args.json_path)
    if not rows:
        raise SystemExit(f"{args.json_path}: no phi-kernels benchmarks (extra_info.throughput) found")
    md = markdown(rows, machine, args.title)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md + "\n")
    pngs = plots(rows, out_dir)
    print(md)
    print(f"\nwrote {os.path.join(out_dir, 'report.md')} and {len(pngs)} plot(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
