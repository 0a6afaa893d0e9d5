"""Rewrite the README's generated tables from bench/results/ (never typed by hand).

    .venv/bin/python bench/readme_table.py     # `make bench` and `make studies` run it last

The performance table sits between the two PERF markers in README.md. Each row reads one
results file; a file that is missing leaves its row out. Each `<!-- STUDY:<name>:START -->`
... `<!-- STUDY:<name>:END -->` block gets the headline table of
bench/results/studies/<name>/study.json (written by `vlp-study`); without that file the block
is left as it is. The `<!-- QUALITY:START -->` ... `<!-- QUALITY:END -->` block gets the
table of results/quality_vs_open_clip.json.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlp.study.report import headline_table

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "results"
STUDIES = RESULTS / "studies"
README = REPO / "README.md"
START, END = "<!-- PERF:START (bench/readme_table.py) -->", "<!-- PERF:END -->"
STUDY_BLOCK = re.compile(
    r"(?P<start><!-- STUDY:(?P<name>[\w.+-]+):START[^\n]*-->)\n"
    r".*?(?P<end><!-- STUDY:(?P=name):END -->)",
    re.DOTALL,
)
QUALITY_BLOCK = re.compile(
    r"(?P<start><!-- QUALITY:START[^\n]*-->)\n.*?(?P<end><!-- QUALITY:END -->)", re.DOTALL
)
QUALITY_METRICS = {
    "acc1": "zero-shot acc1 (Fashion-MNIST test)",
    "acc5": "zero-shot acc5",
    "t2i_r1": "text→image R@1 (test mosaics)",
    "t2i_r5": "text→image R@5",
    "i2t_r1": "image→text R@1",
    "i2t_r5": "image→text R@5",
    "final_loss": "training loss, last 5 steps",
    "seconds": "whole command, s",
}
Row = tuple[str, str, str, str]
"""(what, peer, vlp / peer, note)"""


def shard_rows(d: dict[str, Any]) -> list[Row]:
    """Steady state first (start-up taken out), then the whole command and 1 -> 2 processes."""
    s = d["summary"]
    steady, tools = s["excluding_startup_p1"], s["per_tool"]
    ours, theirs = steady["vlp"]["images_per_s"], steady["img2dataset"]["images_per_s"]
    steady_note = (
        f"{ours:.0f} vs {theirs:.0f} images/s, CPU {steady['vlp']['cpu_ms_per_image']:.1f} vs "
        f"{steady['img2dataset']['cpu_ms_per_image']:.1f} ms/image, without each tool's start-up "
        f"({s['startup_seconds']['vlp']:.1f} vs {s['startup_seconds']['img2dataset']:.1f} s); "
        "goal 1.5x " + ("met" if ours / theirs >= 1.5 else "not met")
    )
    whole = s["ratio_vlp_over_img2dataset"]
    efficiency = {tool: s["scaling_from_1"][tool]["2"]["efficiency"] for tool in steady}
    whole_note = (
        f"peak PSS {tools['vlp']['1']['median_peak_pss_mb']:.0f} vs "
        f"{tools['img2dataset']['1']['median_peak_pss_mb']:.0f} MB; 2 processes "
        f"{whole['2']['paired_median']:.2f}x, scaling 1 -> 2: "
        f"{efficiency['vlp']:.0%} vs {efficiency['img2dataset']:.0%} of linear"
    )
    return [
        ("Sharding, 1 process, steady state", "img2dataset", f"{ours / theirs:.2f}x", steady_note),
        ("Sharding, 1 process, whole command", "img2dataset",
         f"{whole['1']['paired_median']:.2f}x", whole_note),
    ]  # fmt: skip


def train_rows(d: dict[str, Any]) -> list[Row]:
    device = d["machine"]["device"].split(" (")[0].removeprefix("cuda: ")
    rows = []
    for group, g in d["summary"].items():
        r = g["ratio_vlp_over_open_clip"]["steady_samples_per_s"]["paired_median"]
        tools = g["per_tool"]
        goal = (
            f"; goal {g['goal']:.0f}x {'met' if g['goal_met'] else 'not met'}"
            if "goal" in g
            else ""
        )
        whole = g["ratio_vlp_over_open_clip"]["whole_samples_per_s"]["paired_median"]
        note = (
            f"steady {tools['vlp']['median_steady_samples_per_s']:.0f} vs "
            f"{tools['open_clip']['median_steady_samples_per_s']:.0f} samples/s, whole command "
            f"{whole:.2f}x, data wait "
            f"{tools['vlp']['median_data_wait_fraction']:.0%} vs "
            f"{tools['open_clip']['median_data_wait_fraction']:.0%}{goal}"
        )
        batch = d["settings"]["batch_size"]
        rows.append(
            (f"Training {group}, batch {batch}, {device}", "open_clip_train", f"{r:.2f}x", note)
        )
    return rows


def eval_rows(d: dict[str, Any]) -> list[Row]:
    rows = []
    for name, v in d["summary"].items():
        size = name.rsplit(", ", 1)[1].replace(" ", "")  # "shapes, 96 px" -> "96px"
        worst = d["agreement"][size]["max_abs_diff"]
        seconds = v["median_seconds"]
        note = (f"{seconds['vlp-eval']:.1f} vs {seconds['clip_benchmark']:.1f} s; metrics agree: "
                f"max abs difference {worst:.1g}")  # fmt: skip
        ratio = f"{v['speedup_seconds']:.2f}x"
        rows.append((f"Eval wall time, {name}", "clip_benchmark", ratio, note))
    return rows


def retrieval_rows(d: dict[str, Any]) -> list[Row]:
    rows = [exact_row(r) for r in d["runs"]["exact"] if r["n"] == 100_000]
    for r in d.get("mapped") or []:
        if r.get("skipped"):
            continue
        note = (
            f"peak RSS +{r['extra_peak_mb']:.0f} MB (a {r['tile_mb']:.0f} MB score tile) for a "
            f"{r['file_mb'] / 1024:.1f} GB gallery file; {r['seconds']:.0f} s, "
            f"R@1 {r['recalls']['image_retrieval_recall@1']:.3f}"
            + ("; ranks equal to in-RAM" if r.get("equal_to_in_ram") else "")
        )
        what = f"Exact retrieval, memory-mapped {r['n']:,}-item gallery x {r['queries']:,} queries"
        rows.append((what, "gallery in RAM", "bounded", note))
    curve = d.get("faiss_ivf_trained")
    if curve and curve.get("curve"):
        rows.append(faiss_row(curve))
    return rows


def exact_row(r: dict[str, Any]) -> Row:
    note = (
        f"extra peak memory {r['extra_peak_mb']:.0f} MB vs a {r['scores_matrix_mb'] / 1024:.0f} GB "
        f"score matrix; {r['seconds']:.0f} s"
        + (" (extrapolated)" if r["seconds_extrapolated"] else "")
    )
    return ("Exact retrieval, 100k x 100k, 2 cores", "N x N scores", "bounded", note)


def faiss_row(curve: dict[str, Any]) -> Row:
    """The cheapest nprobe that keeps 0.95 of exact R@1 (else the best one), against exact."""
    points = curve["curve"]
    good = [p for p in points if p["r1_vs_exact"] >= 0.95]
    point = good[0] if good else max(points, key=lambda p: p["r1_vs_exact"])
    note = (
        f"nprobe {point['nprobe']} of {curve['ivf_lists']} lists: R@1 "
        f"{point['r1_vs_exact']:.2f}x exact's, search {point['speedup_search']:.1f}x faster "
        f"({point['speedup_with_build']:.1f}x with the index build); {curve['images']:,} images "
        f"of a trained vlp-tiny-coca (exact R@1 "
        f"{curve['exact']['recalls']['image_retrieval_recall@1']:.3f})"
    )
    what = "faiss-ivf retrieval, caption -> image"
    return (what, "exact search", f"{point['speedup_with_build']:.2f}x", note)


def loss_memory_rows(d: dict[str, Any]) -> list[Row]:
    both = [r for r in d["fixed_per_rank_batch"] if "naive_mib" in r][-1]
    largest = d["fixed_per_rank_batch"][-1]
    note = (
        f"{both['local_mib']:.0f} vs {both['naive_mib']:.0f} MiB; at {largest['world']} "
        f"processes {largest['local_mib']:.0f} MiB (linear in processes)"
    )
    what = f"Contrastive loss memory, rank 0 of {both['world']} x {both['per_rank_batch']}"
    return [(what, "full N x N logits", f"{both['local_mib'] / both['naive_mib']:.2f}x", note)]


def gpu_rows(d: dict[str, Any]) -> list[Row]:
    """MFU of whole training runs (in-process steps when there were no runs)."""
    device, rows = d["machine"]["device"], []
    for model, m in d["models"].items():
        runs = (d.get("training_runs") or {}).get(model)
        mfu = {t: (runs or m)[t]["mfu"] for t in ("vlp", "open_clip")}
        where = "training runs" if runs else "in-process step"
        note = (
            f"{mfu['vlp']:.1%} vs {mfu['open_clip']:.1%} of a measured "
            f"{d['bf16_matmul_peak_tflops']:.0f} TFLOP/s ({where}); peak memory "
            f"{m['vlp']['peak_memory_mb']:.0f} vs {m['open_clip']['peak_memory_mb']:.0f} MB"
        )
        what = f"MFU {model}/bf16, batch {m['batch_size']}, {device}"
        rows.append((what, "open_clip_train", f"{mfu['vlp'] / mfu['open_clip']:.2f}x", note))
        if runs:
            rows.append(in_process_row(model, m, device))
    return rows


def in_process_row(model: str, m: dict[str, Any], device: str) -> Row:
    """One training step without data loading: the model, loss and optimizer alone."""
    vlp, peer, compiled = m["vlp"], m["open_clip"], m.get("vlp_compiled")
    note = (
        f"{vlp['samples_per_s']:.0f} vs {peer['samples_per_s']:.0f} samples/s, MFU "
        f"{vlp['mfu']:.1%} vs {peer['mfu']:.1%}"
    )
    if compiled:
        note += f"; torch.compile {compiled['samples_per_s']:.0f} samples/s, {compiled['mfu']:.1%}"
    what = f"Step in-process {model}/bf16, batch {m['batch_size']}, {device}"
    ratio = vlp["samples_per_s"] / peer["samples_per_s"]
    return (what, "open_clip (model, loss, AdamW)", f"{ratio:.2f}x", note)


SOURCES: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "shard_vs_img2dataset.json": shard_rows,
    "train_vs_open_clip.json": train_rows,
    "train_vs_open_clip_cuda.json": train_rows,
    "eval_vs_clip_benchmark.json": eval_rows,
    "retrieval_scale.json": retrieval_rows,
    "loss_memory.json": loss_memory_rows,
    "gpu_train_vs_open_clip.json": train_rows,
    "gpu.json": gpu_rows,
}


def table() -> str:
    lines = ["| Measure | Peer | vlp / peer | Details |", "| --- | --- | --- | --- |"]
    for name, rows in SOURCES.items():
        path = RESULTS / name
        if path.exists():
            lines += [f"| {' | '.join(row)} |" for row in rows(json.loads(path.read_text()))]
    return "\n".join(lines)


def study_blocks(text: str) -> str:
    """Every STUDY block whose study.json exists, rewritten from it."""

    def rewrite(block: re.Match) -> str:
        path = STUDIES / block["name"] / "study.json"
        if not path.is_file():
            return block[0]
        payload = json.loads(path.read_text())
        body = f"{study_caption(payload, path)}\n\n{headline_table(payload)}"
        return f"{block['start']}\n{body}\n{block['end']}"

    return STUDY_BLOCK.sub(rewrite, text)


def study_caption(payload: dict[str, Any], path: Path) -> str:
    report = path.with_name("study.md").relative_to(REPO)
    seeds = ", ".join(map(str, payload["seeds"]))
    return (
        f"`vlp-study {payload['study']}`: seeds {seeds}; {payload['runs_finished']} of "
        f"{payload['runs_total']} runs, {payload['seconds']['runs'] / 3600:.1f} h of training. "
        f"Mean ± half-width of the {payload['confidence']:.0%} Student-t interval over seeds; "
        f"Δ: paired difference against {payload['baseline']} [its interval]. All metrics and "
        f"figures: [{report}]({report})."
    )


def quality_block(text: str) -> str:
    """The QUALITY block rewritten from results/quality_vs_open_clip.json, if it exists."""
    path = RESULTS / "quality_vs_open_clip.json"
    if not path.is_file():
        return text
    d = json.loads(path.read_text())
    s = d["summary"]
    lines = ["| measure | vlp | open_clip | vlp − open_clip |", "| --- | --- | --- | --- |"]
    for key, label in QUALITY_METRICS.items():
        digits = 1 if key == "seconds" else 3
        cells = [_estimate(s["final"][tool][key], digits) for tool in ("vlp", "open_clip")]
        cells.append(_estimate(s["vlp_minus_open_clip"][key], digits, sign=True))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    reach = s["time_to_target"]
    clocks = [reach[t]["mean_curve_clock"] for t in ("vlp", "open_clip")]
    ratio = s["time_ratio_vlp_over_open_clip"]
    lines.append(
        f"| time to open_clip's mean final acc1 ({s['target_acc1']:.3f}), s | "
        + " | ".join("not reached" if c is None else f"{c:.0f}" for c in clocks)
        + f" | {'-' if ratio is None else f'{ratio:.2f}x'} (goal ≤ {s['goal_time_ratio']}x) |"
    )
    git = d["git"]["commit"][:7] + (" (dirty)" if d["git"].get("dirty") else "")
    caption = (
        f"`bench/quality_vs_open_clip.py` at {git}, seeds {', '.join(map(str, s['seeds']))}, "
        f"{d['settings']['samples']:,} samples per run, {d['machine']['cores']} cores of "
        f"{d['machine']['cpu_model']}; "
        "mean ± half-width of the 95 % Student-t interval over seeds, differences paired by seed."
    )
    body = caption + "\n\n" + "\n".join(lines)
    return QUALITY_BLOCK.sub(lambda m: f"{m['start']}\n{body}\n{m['end']}", text)


def _estimate(e: dict[str, Any] | None, digits: int, sign: bool = False) -> str:
    if e is None:
        return "-"
    mean = f"{e['mean']:+.{digits}f}" if sign else f"{e['mean']:.{digits}f}"
    if e["low"] is None:
        return mean
    if sign:
        return f"{mean} [{e['low']:+.{digits}f}, {e['high']:+.{digits}f}]"
    return f"{mean} ± {(e['high'] - e['low']) / 2:.{digits}f}"


def main() -> int:
    text = README.read_text()
    if START not in text or END not in text:
        print(f"readme_table: {README} lacks the markers {START} ... {END}", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(quality_block(study_blocks(f"{head}{START}\n{table()}\n{END}{tail}")))
    print(f"readme_table: {README.relative_to(REPO)} updated from {RESULTS.relative_to(REPO)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
