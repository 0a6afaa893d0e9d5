"""Retrieval at scale: time and peak memory of vlp-eval's retrieval paths as the set grows.

BENCHMARKS.md section 4 (scale), in three parts, each measurement in a fresh process whose
peak-RSS counter is reset once its inputs exist (so "extra peak" is what retrieval needed):

1. Scale: N synthetic image embeddings and N captions (each a noisy copy of its image, so
   recall is neither 0 nor 1), recall@1/5/10 both ways with eval.retrieval.retrieval_ranks:
   exact (tiled exact scores), faiss (IndexFlatIP) and faiss-ivf (inverted file, approximate).
   Above --max-queries, that many queries per direction are scored against the whole gallery
   (recall over them; time scaled by N / max-queries); a run predicted to exceed --budget is
   skipped and the prediction recorded.
2. Beyond RAM: a --mapped-size gallery written to a memory-mapped .npy file under --tmp,
   searched exactly by 1,000 queries; peak RSS against the file's size; at 1M the mapped
   ranks are compared with the in-RAM ranks. The files are deleted afterwards.
3. faiss-ivf on a trained model's embeddings (--checkpoint, --dataset: a retrieval set):
   caption -> image R@k of exact search and of the IVF index for each nprobe, with times
   measured side by side in one process (index build included in the speed-up).

    .venv/bin/python bench/retrieval_scale.py --checkpoint CKPT --dataset SET [--parts ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
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
PARTS = ("scale", "mapped", "curve")
MAPPED_QUERIES = 1000
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CURVE_QUERIES = 10_000
"""Captions (a seeded sample) scored against every image for the nprobe curve."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])))
        return 0
    sizes = ((2_000, 8_000) if args.quick else tuple(args.sizes)) if "scale" in args.parts else ()
    mapped_sizes = (100_000,) if args.quick else (1_000_000, args.mapped_size)
    mapped_sizes = mapped_sizes if "mapped" in args.parts else ()
    timeout = 2 * args.budget
    results = {
        method: run_method(method, sizes, args.budget, args.max_queries) for method in METHODS
    }
    mapped = [run_child(["mapped", str(n), args.tmp], timeout) for n in mapped_sizes]
    for run in mapped:
        print(f"mapped    N={run.get('n', '?'):>10,}  {json.dumps(run)}", flush=True)
    curve = None
    if args.checkpoint and "curve" in args.parts:
        curve = run_child(["curve", args.checkpoint, args.dataset, str(WORK / NAME)], timeout)
        print(f"faiss-ivf on {args.checkpoint}: {json.dumps(curve)}", flush=True)
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
            "shared": "2 cores shared with other jobs, benchmark run at nice 19: times are "
            "upper bounds; ratios come from one process",
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },  # fmt: skip
        "seeds": {"synthetic_embeddings": 0, "faiss_training_sample": 0, "curve_queries": 0},
        "settings": {
            "sizes": sizes,
            "dim": DIM,
            "noise": NOISE,
            "budget_s": args.budget,
            "max_queries": args.max_queries,
            "queries": "min(N, max_queries) per direction against all N; time scaled to N",
            "mapped_queries": MAPPED_QUERIES,
            "nprobes": NPROBES,
            "parts": args.parts,
        },
        "runs": results,
        "mapped": mapped,
        "faiss_ivf_trained": curve,
        "summary": summary,
    }
    path = WORK / f"{NAME}-quick.json" if args.quick else RESULTS / f"{NAME}.json"
    if path.is_file():
        keep_other_parts(payload, json.loads(path.read_text()), args.parts)
    write_results(path, payload)
    print(f"results: {path}")
    return 0


PART_KEYS = {"scale": ("runs", "summary"), "mapped": ("mapped",), "curve": ("faiss_ivf_trained",)}


def keep_other_parts(payload: dict[str, Any], previous: dict[str, Any], parts: list[str]) -> None:
    """A run of some parts keeps the others' results from the previous file, each part's
    provenance (command, commit, machine) in `kept`, so no measured part is lost."""
    kept = dict(previous.get("kept") or {})
    for part in PARTS:
        if part in parts:
            kept.pop(part, None)
            continue
        if not any(previous.get(key) for key in PART_KEYS[part]):
            continue
        for key in PART_KEYS[part]:
            payload[key] = previous.get(key)
        kept.setdefault(part, {k: previous.get(k) for k in ("command", "git", "machine")})
    payload["kept"] = kept


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--budget", type=float, default=600, help="skip runs predicted to run longer (s)"
    )
    parser.add_argument(
        "--max-queries", type=int, default=1000, help="queries scored per direction (1000)"
    )
    parser.add_argument("--mapped-size", type=int, default=10_000_000, metavar="N")
    parser.add_argument("--tmp", default="/tmp", help="where the mapped gallery is written")
    parser.add_argument("--checkpoint", help="a trained checkpoint for the nprobe curve")
    parser.add_argument("--dataset", help="the retrieval set it is scored on")
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="(all)")
    parser.add_argument("--quick", action="store_true", help="2k and 8k only")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if bool(args.checkpoint) != bool(args.dataset):
        parser.error("--checkpoint and --dataset go together")
    return args


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
        run = run_child(["scale", str(size), method, str(max_queries)], timeout=2 * budget)
        runs.append(run)
        if run.get("skipped"):
            print(f"{method:9s} N={size:>9,}  {run['reason']}", flush=True)
            continue
        recall = run["recalls"]["image_retrieval_recall@1"]
        print(f"{method:9s} N={size:>9,}  {run['seconds']:8.2f} s  extra peak "
              f"{run['extra_peak_mb']:8.1f} MB  R@1 {recall:.4f}", flush=True)  # fmt: skip
    return runs


def run_child(child_args: list[str], timeout: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", *child_args]
    size = int(child_args[1]) if child_args[1].isdigit() else None
    try:
        output = subprocess.run(
            command, capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"n": size, "skipped": True, "reason": f"did not finish in {timeout:.0f} s"}
    if output.returncode != 0:
        last = (output.stderr.strip().splitlines() or ["no output"])[-1][-300:]
        return {"n": size, "skipped": True, "reason": f"exited with {output.returncode}: {last}"}
    return json.loads(output.stdout.strip().splitlines()[-1])


def predict(runs: list[dict[str, Any]], size: int) -> float | None:
    """Time at `size` from the measured runs' growth exponent (2 if only one run)."""
    measured = [r for r in runs if not r.get("skipped")]
    if not measured:
        return None
    exponent = fit_exponent([(r["n"], r["seconds"]) for r in measured]) or 2.0
    return measured[-1]["seconds"] * (size / measured[-1]["n"]) ** exponent


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


def scale_child(size: str, method: str, max_queries: str) -> dict[str, Any]:
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


def mapped_child(size: str, tmp: str) -> dict[str, Any]:
    """Exact search of MAPPED_QUERIES noisy copies of gallery rows in a mapped N-row gallery."""
    import torch
    import torch.nn.functional as F

    from eval.embedding_store import EmbeddingWriter, open_embeddings, release
    from eval.exact_search import exact_ranks, tile_shape
    from eval.retrieval import recall_at_k

    n, generator = int(size), torch.Generator().manual_seed(0)
    directory = Path(tempfile.mkdtemp(prefix="vlp-mapped-", dir=tmp))
    try:
        writer = EmbeddingWriter(directory / "gallery.npy", DIM)
        for start in range(0, n, 2**18):  # written a block at a time: never N x D in RAM
            rows = torch.randn(min(2**18, n - start), DIM, generator=generator)
            writer.write(start, F.normalize(rows, dim=1))
        gallery = open_embeddings(writer.close())
        picked = torch.randperm(n, generator=generator)[:MAPPED_QUERIES].sort().values
        noise = NOISE * torch.randn(len(picked), DIM, generator=generator)
        queries = F.normalize(gallery[picked] + noise, dim=1)
        release(gallery)
        positives = (torch.arange(len(picked)), picked)
        baseline = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        start = time.perf_counter()
        ranks = exact_ranks(queries, gallery, positives)
        seconds = time.perf_counter() - start
        peak = _status_kb("VmHWM")
        chunk, block = tile_shape(len(queries), n)
        result = {
            "n": n, "queries": len(queries), "seconds": round(seconds, 2),
            "file_mb": round((directory / "gallery.npy").stat().st_size / 2**20, 1),
            "tile_mb": round(chunk * block * 4 / 2**20, 1), "block_rows": block,
            "baseline_rss_mb": round(baseline / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
            "extra_peak_mb": round((peak - baseline) / 1024, 1),
            "recalls": {f"image_retrieval_recall@{k}": recall_at_k(ranks, k) for k in (1, 5, 10)},
        }  # fmt: skip
        if n <= 1_000_000:  # the same search with the gallery in RAM: ranks must be equal
            in_ram = gallery.clone()
            result["equal_to_in_ram"] = torch.equal(exact_ranks(queries, in_ram, positives), ranks)
        return result
    finally:
        shutil.rmtree(directory)


def curve_child(checkpoint: str, dataset: str, work: str) -> dict[str, Any]:
    """Caption -> image R@k of exact search and of faiss's IVF index per nprobe, one process."""
    import numpy as np
    import torch

    from eval.datasets import open_eval_set
    from eval.embedding_store import open_embeddings
    from eval.exact_search import exact_ranks
    from eval.retrieval import embedding_paths, faiss_index, faiss_search_ranks, recall_at_k

    eval_set, directory = open_eval_set(Path(dataset)), Path(work)
    images_path, texts_path = embedding_paths(str(directory), eval_set)
    owners_path = directory / f"{eval_set.root.name}_owners.npy"
    if not owners_path.exists():  # embeddings of an earlier run are reused
        _encode(checkpoint, eval_set, directory, owners_path)
    images, texts = open_embeddings(images_path), open_embeddings(texts_path)
    owners = torch.from_numpy(np.load(owners_path))
    picked = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    picked = picked[:CURVE_QUERIES].sort().values
    queries, positives = texts[picked].clone(), (torch.arange(len(picked)), owners[picked])

    def timed(function: Any, *args: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        return function(*args), time.perf_counter() - start

    def recalls(ranks: Any) -> dict[str, float]:
        return {f"image_retrieval_recall@{k}": recall_at_k(ranks, k) for k in (1, 5, 10)}

    exact, exact_seconds = timed(exact_ranks, queries, images, positives)
    index, build_seconds = timed(faiss_index, images, True, 0)
    curve = []
    for nprobe in (p for p in NPROBES if p <= index.nlist):
        index.nprobe = nprobe
        ranks, seconds = timed(faiss_search_ranks, index, queries, positives, 10)
        curve.append({
            "nprobe": nprobe, "search_seconds": round(seconds, 3), "recalls": recalls(ranks),
            "r1_vs_exact": round(recall_at_k(ranks, 1) / max(recall_at_k(exact, 1), 1e-9), 4),
            "speedup_search": round(exact_seconds / seconds, 2),
            "speedup_with_build": round(exact_seconds / (seconds + build_seconds), 2),
        })  # fmt: skip
    return {
        "checkpoint": checkpoint, "dataset": dataset, "images": len(images),
        "captions": len(texts), "dim": images.shape[1], "queries": len(queries),
        "exact": {"seconds": round(exact_seconds, 3), "recalls": recalls(exact)},
        "ivf_lists": index.nlist, "ivf_build_seconds": round(build_seconds, 3), "curve": curve,
    }  # fmt: skip


def _encode(checkpoint: str, eval_set: Any, directory: Path, owners_path: Path) -> None:
    """The set's embeddings as vlp-eval --embeddings-dir writes them, and each caption's image."""
    import numpy as np

    from eval.checkpoints import resolve_checkpoint
    from eval.models import load_model
    from eval.options import EvalOptions
    from eval.retrieval import run_zeroshot_retrieval

    model = load_model(resolve_checkpoint(Path(checkpoint), None), None, "fp32")
    options = EvalOptions(embeddings_dir=str(directory))
    outputs = run_zeroshot_retrieval(model, eval_set, options)
    np.save(owners_path, outputs.text_to_image.numpy())


CHILDREN = {"scale": scale_child, "mapped": mapped_child, "curve": curve_child}


def _status_kb(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: resident now; VmHWM: peak since clear_refs)."""
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
