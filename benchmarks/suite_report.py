"""Merge gpu_suite.sh's bench.py records into one JSON and one markdown table (workload, base tok/s,
new tok/s, ratio), printed last.

    python benchmarks/suite_report.py RUNS_DIR --out OUT_DIR

RUNS_DIR holds `<workload>.<label>.json` files (label: new, base, or structured-<kind>), each one
`bench.py --json` record; OUT_DIR gets suite.json and suite.md.
"""
import argparse
import glob
import json
import os

LATENCY_ROWS = (("ttft_s", "TTFT, 512-token prompt"), ("tpot_batch1_s", "TPOT batch 1"),
                ("tpot_full_batch_s", "TPOT batch {full_batch}"))


def load_runs(runs_dir: str) -> dict[str, dict[str, dict]]:
    """{workload: {label: that run's record for the workload}}, in the order the runs were made."""
    runs: dict[str, dict[str, dict]] = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, "*.json")), key=os.path.getmtime):
        workload, label = os.path.basename(path)[:-len(".json")].split(".", 1)
        with open(path) as f:
            record = json.load(f)
        runs.setdefault(workload, {})[label] = {**{k: v for k, v in record.items() if k != "workloads"},
                                                **record["workloads"][workload]}
    return runs


def ratio(new: float | None, base: float | None) -> str:
    return f"{new / base:.2f}x" if new and base else "-"


def fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def table(runs: dict[str, dict[str, dict]]) -> list[str]:
    rows = ["| workload | base tok/s | new tok/s | new / base |", "|---|---:|---:|---:|"]
    for workload, by_label in runs.items():
        base, new = by_label.get("base", {}), by_label.get("new", {})
        b, n = base.get("throughput_tok_s"), new.get("throughput_tok_s")
        scaled = "" if new.get("workload", {}).get("full_size", True) else " (scaled)"
        rows.append(f"| {workload}{scaled} | {fmt(b)} | {fmt(n)} | {ratio(n, b)} |")
        if workload == "prefill":  # prompt-bound: its prompt tokens/s is the figure a user reads
            b, n = base.get("prompt_throughput_tok_s"), new.get("prompt_throughput_tok_s")
            rows.append(f"| {workload}, prompt tokens/s | {fmt(b)} | {fmt(n)} | {ratio(n, b)} |")
        for label, run in by_label.items():
            if label.startswith("structured-"):
                s = run.get("throughput_tok_s")
                rows.append(f"| {workload}, {label} ({run['total_output_tokens']:,} tokens; ratio vs new "
                            f"unconstrained) | - | {fmt(s)} | {ratio(s, n)} |")
    reference = runs.get("reference", {})
    full_batch = reference.get("new", reference.get("base", {})).get("workload", {}).get("requests")
    for key, name in LATENCY_ROWS:
        b, n = (reference.get(label, {}).get("latency", {}).get(key) for label in ("base", "new"))
        if b or n:
            rows.append(f"| {name.format(full_batch=full_batch)} (ms; lower is better) | {fmt(b, 1e3, 2)} | "
                        f"{fmt(n, 1e3, 2)} | {ratio(n, b)} |")
    return rows


def header(runs: dict[str, dict[str, dict]]) -> list[str]:
    first = next((r for by_label in runs.values() for r in by_label.values()), {})
    lines = [f"# bench.py suite, {first.get('timestamp', '?')}, {first.get('device_name', '?')}", ""]
    for label in ("new", "base"):
        run = next((by_label[label] for by_label in runs.values() if label in by_label), None)
        if run:
            pkg = run.get("package", {})
            lines.append(f"- {label}: nanovllm {pkg.get('version')} at {pkg.get('path')}, commit {pkg.get('commit')}")
    if first:
        lines.append(f"- engine: {first.get('engine_config')}; torch {first.get('torch')}, CUDA {first.get('cuda')}")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir")
    p.add_argument("--out", required=True, help="folder for suite.json and suite.md")
    args = p.parse_args(argv)
    runs = load_runs(args.runs_dir)
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump(runs, f, indent=2, default=str)
    text = "\n".join(header(runs) + table(runs)) + "\n"
    with open(os.path.join(args.out, "suite.md"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
