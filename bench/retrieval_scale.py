"""Retrieval at scale: time and peak memory of vlp-eval's retrieval paths as the set grows.

BENCHMARKS.md section 4 (scale). N synthetic image embeddings and N captions (each a noisy
copy of its image, so recall is neither 0 nor 1), recall@1/5/10 in both directions with
eval.retrieval.retrieval_ranks, for each method:

- exact:     chunked exact scores (torch); memory is one chunk (256 MiB) plus O(N)
- faiss:     faiss's exact inner-product index (IndexFlatIP)
- faiss-ivf: faiss's inverted-file index (approximate; recall compared with exact)

Each (method, N) runs in a fresh process, which resets its peak-RSS counter after building
the embeddings, so "extra peak" is the memory retrieval itself needed. Above --max-queries,
only that many queries per direction are scored, against the whole N-item gallery, and the
time is scaled by N / max-queries (every query costs the same against a fixed gallery; the
gallery-side memory is measured as it is). A run whose time, predicted from the smaller sizes'
fitted growth exponent, would keep it busy longer than --budget is skipped and the prediction
recorded instead; a run that fails or exceeds twice the budget is recorded as such.

    .venv/bin/python bench/retrieval_scale.py               # 10k, 100k, 1M
    .venv/bin/python bench/retrieval_scale.py --quick       # 2k, 8k; results in bench/.work/
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the helpers live beside this script, not in a package)
    REPO,
    RESULTS,
    WORK,
    dist_version,
    git_state,
    machine_info,
    write_results,
)

NAME = "retrieval_scale"
METHODS = ("exact", "faiss", "faiss-ivf")
DIM = 64
NOISE = 0.15
"""Per-dimension noise added to an image to make its caption (cosine about 0.65)."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    sizes = (2_000, 8_000) if args.quick else tuple(args.sizes)
    results = {
        method: run_method(method, sizes, args.budget, args.max_queries) for method in METHODS
    }
    summary = summarize(results)
    print_report(results, summary)
    payload = {
        "benchmark": NAME,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": git_state(),
        "machine": {
            **machine_info(),
            "device": "cpu",
            "torch": dist_version(sys.executable, "torch"),
            "faiss": dist_version(sys.executable, "faiss-cpu"),
        },  # fmt: skip
        "settings": {
            "sizes": sizes,
            "dim": DIM,
            "noise": NOISE,
            "budget_s": args.budget,
            "max_queries": args.max_queries,
            "queries": "min(N, max_queries) captions against N images, as many images against "
            "N captions; time scaled to N queries",
        },
        "runs": results,
        "summary": summary,
    }
    path = WORK / f"{NAME}-quick.json" if args.quick else RESULTS / f"{NAME}.json"
    write_results(path, payload)
    print(f"results: {path}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--budget", type=float, default=600, help="skip runs predicted to run longer (s)"
    )
    parser.add_argument(
        "--max-queries", type=int, default=20_000, help="queries scored per direction (20000)"
    )
    parser.add_argument("--quick", action="store_true", help="2k and 8k only")
    parser.add_argument("--child", nargs=3, metavar=("N", "METHOD", "Q"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_method(
    method: str, sizes: tuple[int, ...], budget: float, max_queries: int
) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for size in sizes:
        predicted = predict(runs, size)
        # what the capped run itself would take: its share of the queries
        runtime = predicted * min(size, max_queries) / size if predicted is not None else None
        if runtime is not None and runtime > budget:
            runs.append({"n": size, "skipped": True, "predicted_seconds": round(predicted)})
            print(f"{method:9s} N={size:>9,}  skipped: would run {runtime:,.0f} s", flush=True)
            continue
        run = run_child(size, method, max_queries, timeout=2 * budget)
        runs.append(run)
        if run.get("skipped"):
            print(f"{method:9s} N={size:>9,}  {run['reason']}", flush=True)
            continue
        recall = run["recalls"]["image_retrieval_recall@1"]
        print(
            f"{method:9s} N={size:>9,}  {run['seconds']:8.2f} s  extra peak "
            f"{run['extra_peak_mb']:8.1f} MB  R@1 {recall:.4f}",
            flush=True,
        )
    return runs


def run_child(size: int, method: str, max_queries: int, timeout: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(size), method, str(max_queries)]
    try:
        output = subprocess.run(
            command, capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"n": size, "skipped": True, "reason": f"did not finish in {timeout:.0f} s"}
    if output.returncode != 0:
        last = (output.stderr.strip().splitlines() or ["no output"])[-1]
        return {"n": size, "skipped": True, "reason": f"exited with {output.returncode}: {last}"}
    return json.loads(output.stdout.strip().splitlines()[-1])


def predict(runs: list[dict[str, Any]], size: int) -> float | None:
    """Time at `size` from the measured runs' growth exponent (2 if only one run)."""
    measured = [r for r in runs if not r.get("skipped")]
    if not measured:
        return None
    exponent = fit_exponent([(r["n"], r["seconds"]) for r in measured]) or 2.0
    last = measured[-1]
    return last["seconds"] * (size / last["n"]) ** exponent


def fit_exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(value) against log(n)."""
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(max(v, 1e-9)) for _, v in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return numerator / sum((x - mean_x) ** 2 for x in xs)


# --- one measurement, in its own process ------------------------------------------------


def child(size: str, method: str, max_queries: str) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from eval.retrieval import recall_at_k, retrieval_ranks

    n, queries = int(size), min(int(size), int(max_queries))
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(n, DIM, generator=generator), dim=1)
    captions = F.normalize(images + NOISE * torch.randn(n, DIM, generator=generator), dim=1)

    def both_directions(count: int) -> tuple[float, Any, Any]:
        """Seconds for the first `count` captions and images against all N; their ranks."""
        pairs = (torch.arange(count), torch.arange(count))  # caption i belongs to image i
        start = time.perf_counter()
        text_to_image = retrieval_ranks(captions[:count], images, pairs, method, 10)
        image_to_text = retrieval_ranks(images[:count], captions, pairs, method, 10)
        return time.perf_counter() - start, text_to_image, image_to_text

    # 64 queries: the warm-up, and the cost paid once per call (faiss builds its index)
    fixed, _, _ = both_directions(64)
    baseline = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    elapsed, text_to_image, image_to_text = both_directions(queries)
    peak = _status_kb("VmHWM")
    seconds = elapsed if queries == n else fixed + (elapsed - fixed) * n / queries
    recalls = {}
    for k in (1, 5, 10):
        recalls[f"image_retrieval_recall@{k}"] = recall_at_k(text_to_image, k)
        recalls[f"text_retrieval_recall@{k}"] = recall_at_k(image_to_text, k)
    return {
        "n": n,
        "method": method,
        "queries_per_direction": queries,
        "seconds": round(seconds, 3),
        "seconds_extrapolated": queries < n,
        "seconds_measured": round(elapsed, 3),
        "seconds_fixed": round(fixed, 3),
        "baseline_rss_mb": round(baseline / 1024, 1),
        "peak_rss_mb": round(peak / 1024, 1),
        "extra_peak_mb": round((peak - baseline) / 1024, 1),
        "scores_matrix_mb": round(n * n * 4 / 2**20, 1),
        "recalls": recalls,
    }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# --- summary ------------------------------------------------------------------------------


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    exact = {r["n"]: r for r in results["exact"] if not r.get("skipped")}
    for method, runs in results.items():
        measured = [r for r in runs if not r.get("skipped")]
        time_exponent = fit_exponent([(r["n"], r["seconds"]) for r in measured])
        memory_exponent = fit_exponent([(r["n"], max(r["extra_peak_mb"], 0.1)) for r in measured])
        summary[method] = {
            "time_exponent": round(time_exponent, 3) if time_exponent else None,
            "extra_memory_exponent": round(memory_exponent, 3) if memory_exponent else None,
            "max_recall_difference_vs_exact": _recall_gap(measured, exact),
        }
    return summary


def _recall_gap(runs: list[dict[str, Any]], exact: dict[int, dict[str, Any]]) -> float | None:
    gaps = [
        abs(value - exact[r["n"]]["recalls"][name])
        for r in runs
        if r["n"] in exact
        for name, value in r["recalls"].items()
    ]
    return round(max(gaps), 5) if gaps else None


def print_report(results: dict[str, list[dict[str, Any]]], summary: dict[str, Any]) -> None:
    print(f"\n{'method':10s} {'time exp.':>9s} {'memory exp.':>11s} {'max |Δ recall|':>15s}")
    for method, row in summary.items():
        print(f"{method:10s} {row['time_exponent']!s:>9s} {row['extra_memory_exponent']!s:>11s} "
              f"{row['max_recall_difference_vs_exact']!s:>15s}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
