"""Sharding throughput: `vlp-shard table` vs img2dataset on the same local images.

BENCHMARKS.md section 5. Both tools read one parquet table of `file://` image paths with
captions, resize to the same size and mode, re-encode as JPEG at the same quality and write
webdataset tars with the same number of samples per shard, using the same number of processes.
Each run is one complete command, timed from start to exit; tools alternate (A B A B ...).

    .venv/bin/python bench/shard_vs_img2dataset.py            # as `make bench` runs it
    .venv/bin/python bench/shard_vs_img2dataset.py --quick    # smoke check, seconds
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    RESULTS,
    WORK,
    PeerError,
    RunResult,
    dist_version,
    ensure_venv,
    git_state,
    machine_info,
    photo_like_jpegs,
    run_timed,
    write_results,
)

NAME = "shard_vs_img2dataset"
PEER_REQUIREMENT = "img2dataset==1.47.0"
STARTUP_IMAGES = 10
VLP, I2D = "vlp", "img2dataset"
MIN_IMAGES_FOR_STEADY_RATE = 20 * STARTUP_IMAGES
"""Below this, a run is too close to a start-up run for their difference to mean anything."""
NOISY_SHARE = 0.1
"""Above this share of the machine's CPU used by other processes, the report says so."""


@dataclass(frozen=True)
class Settings:
    images: int
    repeats: int
    processes: tuple[int, ...]
    samples_per_shard: int
    i2d_threads: int
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    """Shorter side = image_size in both tools (img2dataset: albumentations SmallestMaxSize)."""
    encode_format: str = "jpg"
    quality: int = 95


@dataclass(frozen=True)
class Tool:
    name: str
    command: Callable[[Path, Path, str], list[str]]
    """(table, output folder, processes) -> argv; processes is text so a template can say P."""
    shard_dir: Callable[[Path], Path]
    """Where the tars are, given the output folder."""
    env: dict[str, str]


@dataclass(frozen=True)
class Output:
    images: int
    tar_bytes: int
    image_bytes: int
    wrong_size: int
    """Images whose shorter side is not the target size (must be 0: same resize semantics)."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    peer_env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    # albumentations (imported by img2dataset) otherwise asks PyPI for a newer version at
    # every start-up: a network wait that is not sharding work
    try:
        peer_python = ensure_venv("img2dataset", [PEER_REQUIREMENT], "import img2dataset", peer_env)
    except PeerError as err:
        print(f"{NAME}: cannot set up img2dataset: {err}", file=sys.stderr)
        return 2
    tools = [vlp_tool(settings), img2dataset_tool(settings, peer_python, peer_env)]
    tables = prepare_inputs(settings.images)

    try:
        # the start-up runs come first and begin with an untimed round, which also warms up
        # the caches for the main runs
        startup = measure(tools, tables[STARTUP_IMAGES], STARTUP_IMAGES, (1,), settings, True)
        runs = measure(
            tools, tables[settings.images], settings.images, settings.processes, settings
        )
    except RuntimeError as err:  # a tool failed: its log says why, no traceback of ours needed
        print(f"{NAME}: {err}", file=sys.stderr)
        return 1
    summary = summarize(runs, startup, settings)
    print_report(summary, runs, settings)
    path = WORK / "results-quick.json" if args.quick else RESULTS / f"{NAME}.json"
    write_results(path, result_payload(settings, peer_python, runs, startup, summary))
    print(f"results: {path}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images to shard (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool and process count")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], metavar="P")
    parser.add_argument("--samples-per-shard", type=int, default=1000, metavar="N")
    parser.add_argument(
        "--i2d-threads",
        type=int,
        default=16,
        help="img2dataset's download threads per process (default 16; it resizes on one)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="40 images, 1 repeat; results in bench/.work/"
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        # 20 per shard keeps two shards, so two processes still have work each
        return Settings(40, 1, tuple(args.processes), 20, args.i2d_threads)
    if min(args.images, args.repeats, args.samples_per_shard, *args.processes) < 1:
        raise SystemExit(
            f"{NAME}: --images, --repeats, --samples-per-shard and --processes must be at least 1"
        )
    shards = -(-args.images // args.samples_per_shard)
    if shards < max(args.processes):
        print(f"warning: {shards} shard(s) cannot keep {max(args.processes)} processes busy")
    return Settings(
        args.images, args.repeats, tuple(args.processes), args.samples_per_shard, args.i2d_threads
    )


# --- the two commands --------------------------------------------------------------------


def vlp_tool(s: Settings) -> Tool:
    def command(table: Path, out: Path, processes: str) -> list[str]:
        return [
            sys.executable, "-m", "data_tools", "table", str(table), str(out),
            "--image-col", "url", "--caption-col", "caption",
            "--image-size", str(s.image_size), "--resize-mode", s.resize_mode,
            "--format", s.encode_format, "--quality", str(s.quality),
            "--samples-per-shard", str(s.samples_per_shard),
            "--workers", processes, "--overwrite",
        ]  # fmt: skip

    return Tool(VLP, command, lambda out: out / "train", dict(os.environ))


def img2dataset_tool(s: Settings, python: Path, env: dict[str, str]) -> Tool:
    def command(table: Path, out: Path, processes: str) -> list[str]:
        return [
            str(python.parent / "img2dataset"),
            f"--url_list={table}", "--input_format=parquet",
            "--url_col=url", "--caption_col=caption",
            "--output_format=webdataset", f"--output_folder={out}",
            f"--image_size={s.image_size}", f"--resize_mode={s.resize_mode}",
            f"--encode_format={s.encode_format}", f"--encode_quality={s.quality}",
            f"--number_sample_per_shard={s.samples_per_shard}",
            f"--processes_count={processes}", f"--thread_count={s.i2d_threads}",
            "--distributor=multiprocessing",
            # vlp neither hashes inputs nor parses EXIF: both off so each tool does the same work
            "--compute_hash=None", "--extract_exif=False",
            # no --incremental_mode=overwrite: in 1.47.0 it deletes the output folder after
            # creating its own _tmp in it, and every shard then fails; the output folder is
            # removed before each run instead, for both tools
            "--enable_wandb=False",
        ]  # fmt: skip

    return Tool(I2D, command, lambda out: out, env)


# --- inputs ------------------------------------------------------------------------------


def prepare_inputs(images: int) -> dict[int, Path]:
    """Photo-like JPEGs and one parquet table per image count, keyed by that count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = photo_like_jpegs(WORK / "images", max(images, STARTUP_IMAGES))
    tables = {}
    for count in (STARTUP_IMAGES, images):
        urls = [f"file://{path.resolve()}" for path in paths[:count]]
        captions = [f"a soft, grainy cloud of colours, picture {i}" for i in range(count)]
        tables[count] = WORK / f"table-{count}.parquet"
        pq.write_table(pa.table({"url": urls, "caption": captions}), tables[count])
    # one read of every image now, so that the first timed tool does not pay alone for a
    # cold page cache
    for path in paths:
        path.read_bytes()
    return tables


# --- runs --------------------------------------------------------------------------------


def measure(
    tools: list[Tool],
    table: Path,
    images: int,
    processes: tuple[int, ...],
    s: Settings,
    warmup: bool = False,
) -> list[dict[str, Any]]:
    """Alternate the tools, `s.repeats` rounds over every process count.

    An untimed first round (`warmup`) keeps whichever tool runs first from paying alone for
    cold bytecode and page caches.
    """
    records = []
    for repeat in range(-1 if warmup else 0, s.repeats):
        for procs in processes:
            for tool in tools:
                out = WORK / "out" / tool.name
                shutil.rmtree(out, ignore_errors=True)
                log = WORK / "logs" / f"{tool.name}-{images}-p{procs}-{repeat}.log"
                result = run_timed(tool.command(table, out, str(procs)), log, tool.env)
                if repeat < 0:
                    continue
                output = count_output(tool.shard_dir(out), s.image_size)
                check_output(tool.name, output, images, log)
                records.append(run_record(tool.name, procs, repeat, result, output))
                print(
                    f"  {tool.name:<11} {images:>5} images  p{procs}  run {repeat + 1}: "
                    f"{result.seconds:6.2f} s  {output.images / result.seconds:7.1f} img/s",
                    flush=True,
                )
    return records


def run_record(
    tool: str, processes: int, repeat: int, result: RunResult, output: Output
) -> dict[str, Any]:
    return {
        "tool": tool,
        "processes": processes,
        "repeat": repeat,
        "seconds": round(result.seconds, 3),
        "images_per_s": round(output.images / result.seconds, 2),
        "cpu_seconds": round(result.cpu_seconds, 3),
        "cpu_ms_per_image": round(1000 * result.cpu_seconds / output.images, 3),
        "others_cpu_share": round(result.others_cpu_share, 3),
        "peak_pss_mb": round(result.peak_pss_mb, 1),
        **asdict(output),
    }


def count_output(shard_dir: Path, size: int) -> Output:
    """Images, bytes and a target-size check over every tar a tool wrote."""
    from PIL import Image

    images = image_bytes = wrong = tar_bytes = 0
    for path in sorted(shard_dir.glob("*.tar")):
        tar_bytes += path.stat().st_size
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                data = tar.extractfile(member).read()
                images += 1
                image_bytes += len(data)
                # Image.open parses only the header: cheap, and enough for the size check
                wrong += min(Image.open(io.BytesIO(data)).size) != size
    return Output(images, tar_bytes, image_bytes, wrong)


def check_output(tool: str, output: Output, expected: int, log: Path) -> None:
    """A faster tool that drops images or resizes differently is not faster at the same job."""
    if output.images != expected or output.wrong_size:
        raise SystemExit(
            f"{NAME}: {tool} wrote {output.images}/{expected} images, "
            f"{output.wrong_size} with the shorter side not the target size; see {log}"
        )


# --- summary -----------------------------------------------------------------------------


def summarize(
    runs: list[dict[str, Any]], startup: list[dict[str, Any]], s: Settings
) -> dict[str, Any]:
    per_tool = {
        tool: {str(p): _cell([r for r in runs if r["tool"] == tool and r["processes"] == p])
               for p in s.processes}
        for tool in (VLP, I2D)
    }  # fmt: skip
    ratios = {str(p): _ratio(runs, p, per_tool) for p in s.processes}
    startup_s = {
        tool: statistics.median(r["seconds"] for r in startup if r["tool"] == tool)
        for tool in (VLP, I2D)
    }
    summary: dict[str, Any] = {
        "per_tool": per_tool,
        "ratio_vlp_over_img2dataset": ratios,
        "startup_seconds": startup_s,
    }
    if 1 in s.processes:
        summary["scaling_from_1"] = {
            tool: {str(p): _scaling(per_tool[tool], p) for p in s.processes if p != 1}
            for tool in (VLP, I2D)
        }
    if 1 in s.processes and s.images >= MIN_IMAGES_FOR_STEADY_RATE:
        # start-up is a fixed cost; without it is what a large job converges to
        summary["excluding_startup_p1"] = {
            tool: _steady(per_tool[tool]["1"], [r for r in startup if r["tool"] == tool], s)
            for tool in (VLP, I2D)
        }
    return summary


def _steady(cell: dict[str, Any], startup: list[dict[str, Any]], s: Settings) -> dict[str, float]:
    """Rate and CPU per image of the images beyond the start-up run's, from the medians."""
    extra = s.images - STARTUP_IMAGES
    seconds = cell["median_seconds"] - statistics.median(r["seconds"] for r in startup)
    cpu = cell["median_cpu_ms_per_image"] * s.images / 1000 - statistics.median(
        r["cpu_seconds"] for r in startup
    )
    return {
        "images_per_s": round(extra / seconds, 1),
        "cpu_ms_per_image": round(1000 * cpu / extra, 3),
    }


def _cell(records: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["images_per_s"] for r in records]
    return {
        "median_seconds": statistics.median(r["seconds"] for r in records),
        "median_images_per_s": statistics.median(rates),
        "min_images_per_s": min(rates),
        "max_images_per_s": max(rates),
        "median_cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in records),
        "median_others_cpu_share": statistics.median(r["others_cpu_share"] for r in records),
        "median_peak_pss_mb": statistics.median(r["peak_pss_mb"] for r in records),
        "tar_bytes": records[0]["tar_bytes"],
        "image_bytes": records[0]["image_bytes"],
    }


def _ratio(runs: list[dict[str, Any]], p: int, per_tool: dict[str, Any]) -> dict[str, float]:
    """Median of per-round ratios (each pair ran back to back, so it shares the machine's
    state of the moment), and the ratio of the medians."""
    rate = {(r["tool"], r["repeat"]): r["images_per_s"] for r in runs if r["processes"] == p}
    rounds = sorted({repeat for _, repeat in rate})
    paired = [rate[VLP, i] / rate[I2D, i] for i in rounds]
    medians = (
        per_tool[VLP][str(p)]["median_images_per_s"] / per_tool[I2D][str(p)]["median_images_per_s"]
    )
    return {"paired_median": round(statistics.median(paired), 3), "of_medians": round(medians, 3)}


def _scaling(cells: dict[str, Any], p: int) -> dict[str, float]:
    """Wall-clock speed-up, and CPU per image relative to 1 process: the parallel overhead,
    which other load on the machine barely moves, unlike the speed-up."""
    speedup = cells[str(p)]["median_images_per_s"] / cells["1"]["median_images_per_s"]
    cpu = cells[str(p)]["median_cpu_ms_per_image"] / cells["1"]["median_cpu_ms_per_image"]
    return {
        "speedup": round(speedup, 3),
        "efficiency": round(speedup / p, 3),
        "cpu_per_image_vs_1": round(cpu, 3),
    }


def print_report(summary: dict[str, Any], runs: list[dict[str, Any]], s: Settings) -> None:
    print(
        f"\n{s.images} local JPEGs -> {s.image_size} px {s.resize_mode}, {s.encode_format} "
        f"q{s.quality}, {s.samples_per_shard}/shard; median of {s.repeats} alternating runs; "
        f"img2dataset threads {s.i2d_threads}"
    )
    print(
        f"{'tool':<12}{'procs':>6}{'seconds':>9}{'images/s':>10}{'min-max':>11}{'CPU ms/img':>12}"
        f"{'others':>8}{'peak PSS MB':>13}{'tar MB':>8}{'KB/img':>8}"
    )
    for tool, cells in summary["per_tool"].items():
        for p, c in cells.items():
            print(
                f"{tool:<12}{p:>6}{c['median_seconds']:>9.2f}{c['median_images_per_s']:>10.1f}"
                f"{c['min_images_per_s']:>7.0f}-{c['max_images_per_s']:<3.0f}"
                f"{c['median_cpu_ms_per_image']:>12.2f}{c['median_others_cpu_share']:>8.0%}"
                f"{c['median_peak_pss_mb']:>13.0f}{c['tar_bytes'] / 1e6:>8.1f}"
                f"{c['image_bytes'] / 1e3 / s.images:>8.1f}"
            )
    for p, r in summary["ratio_vlp_over_img2dataset"].items():
        print(
            f"vlp/img2dataset images/s with {p} process(es): {r['paired_median']:.2f}x "
            f"(ratio of medians {r['of_medians']:.2f}x)"
        )
    for tool, by_p in summary.get("scaling_from_1", {}).items():
        for p, x in by_p.items():
            print(
                f"{tool} scaling 1->{p}: {x['speedup']:.2f}x ({x['efficiency']:.0%} of linear); "
                f"CPU per image {x['cpu_per_image_vs_1']:.2f}x that of 1 process"
            )
    st = summary["startup_seconds"]
    print(f"start-up ({STARTUP_IMAGES} images, 1 process): vlp {st[VLP]:.2f} s, "
          f"img2dataset {st[I2D]:.2f} s")  # fmt: skip
    if "excluding_startup_p1" in summary:
        ex = summary["excluding_startup_p1"]
        print(
            f"without start-up, 1 process: vlp {ex[VLP]['images_per_s']:.1f} images/s "
            f"({ex[VLP]['cpu_ms_per_image']:.2f} CPU ms/img), img2dataset "
            f"{ex[I2D]['images_per_s']:.1f} images/s ({ex[I2D]['cpu_ms_per_image']:.2f} CPU ms/img)"
        )
    busiest = max(r["others_cpu_share"] for r in runs)
    if busiest > NOISY_SHARE:
        print(
            f"note: other processes used up to {busiest:.0%} of the machine's CPU during these "
            "runs ('others'); wall times and scaling were squeezed by it, CPU ms/img much less"
        )


def result_payload(
    s: Settings,
    peer_python: Path,
    runs: list[dict[str, Any]],
    startup: list[dict[str, Any]],
    summary: dict[str, Any],
) -> dict[str, Any]:
    from PIL import features

    tools = {"vlp": vlp_tool(s), "img2dataset": img2dataset_tool(s, peer_python, {})}
    table, out = WORK / f"table-{s.images}.parquet", WORK / "out" / "TOOL"
    return {
        "benchmark": NAME,
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "git": git_state(),
        "machine": {
            **machine_info(),
            "pillow": dist_version(sys.executable, "pillow"),
            "libjpeg_turbo": features.version("libjpeg_turbo"),
            "img2dataset": dist_version(peer_python, "img2dataset"),
            "opencv": dist_version(peer_python, "opencv-python-headless"),
        },
        "settings": {
            **asdict(s),
            "startup_images": STARTUP_IMAGES,
            "commands": {
                name: [arg.replace(f"{REPO}/", "") for arg in tool.command(table, out, "P")]
                for name, tool in tools.items()
            },
        },
        "runs": runs,
        "startup_runs": startup,
        "summary": summary,
    }


if __name__ == "__main__":
    sys.exit(main())
