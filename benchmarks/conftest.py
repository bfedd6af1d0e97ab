"""pytest plugin for benchmarks/: ratios against the best peer, and a summary table.

Every benchmark records (through benchmarks.harness.bench) its group, provider, ours flag and
throughput. After the run, each provider's throughput is divided by the best peer's (ours=False)
in the same group: > 1 means faster than every peer measured in this run.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # The Triton backend can only be interpreted here; interpreted timings are meaningless,
    # so the benchmarks skip it (with the reason) rather than time it.
    os.environ.pop("TRITON_INTERPRET", None)

_RESULTS: list[dict] = []


def _ratios(rows: list[dict]) -> None:
    best: dict[str, float] = {}
    roof: dict[str, float] = {}
    for r in rows:
        table = roof if r.get("roofline") else (best if not r["ours"] else None)
        if table is not None:
            table[r["group"]] = max(table.get(r["group"], 0.0), r["throughput"])
    for r in rows:
        b, rf = best.get(r["group"]), roof.get(r["group"])
        r["ratio_vs_best_peer"] = (r["throughput"] / b) if b else None
        r["ratio_vs_roofline"] = (r["throughput"] / rf) if rf else None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    rows = []
    for bm in output_json.get("benchmarks", []):
        info = bm.get("extra_info", {})
        if "throughput" in info:
            rows.append({"group": bm.get("group"), "ours": info["ours"], "roofline": info.get("roofline", False),
                         "throughput": info["throughput"], "info": info})
    _ratios(rows)
    for r in rows:
        r["info"]["ratio_vs_best_peer"] = r["ratio_vs_best_peer"]
        r["info"]["ratio_vs_roofline"] = r["ratio_vs_roofline"]


def pytest_runtest_makereport(item, call):
    if call.when != "call":
        return
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    info = getattr(fixture, "extra_info", None) if fixture is not None else None
    if info and "throughput" in info:
        _RESULTS.append({"group": fixture.group, "provider": info["provider"], "ours": info["ours"],
                         "roofline": info.get("roofline", False), "throughput": info["throughput"],
                         "unit": info["unit"]})


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    _ratios(_RESULTS)
    tr = terminalreporter
    tr.section("phi-kernels: throughput and ratio against the best peer in this run")
    for group in sorted({r["group"] for r in _RESULTS}):
        tr.write_line(group)
        for r in sorted((r for r in _RESULTS if r["group"] == group), key=lambda r: -r["throughput"]):
            ratio = "" if r["ratio_vs_best_peer"] is None else f"{r['ratio_vs_best_peer']:.2f}x best peer"
            if r["ratio_vs_roofline"] is not None and not r["roofline"]:
                ratio += f"  {r['ratio_vs_roofline']:.2f}x roofline"
            tag = "roof" if r["roofline"] else ("ours" if r["ours"] else "peer")
            tr.write_line(f"    {r['provider']:34s} {tag}  {r['throughput']:10.3f} {r['unit']:8s} {ratio}")
