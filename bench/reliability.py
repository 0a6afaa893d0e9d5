"""Reliability figures: SIGKILLs, full disks, corrupt shards, bad input, untrusted files, misuse.

    python bench/reliability.py [--kills 24] [--steps 40] [--per-kind 3] [--fuzz-examples 1000]
                                [--sections misuse ...]

The faults come from tests/reliability/faults.py, the same helpers the CI tests use at a smaller
size; the bad-input, untrusted-file and eval-robustness groups run those test files with more
fuzzed examples; the misuse trials (tests/reliability/misuse.py) misuse a run directory.
Writes bench/results/reliability.json and prints a summary. `--sections` reruns only the named
sections and keeps the others' figures from the existing results file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench._common import RESULTS, WORK, git_state, machine_info, write_results  # noqa: E402
from data_tools.verify import verify  # noqa: E402
from tests.reliability import faults  # noqa: E402
from tests.reliability.misuse import misuse_trials  # noqa: E402

OUT = RESULTS / "reliability.json"
SECTIONS = ("kill_resume", "disk_full", "data_faults", "bad_input", "untrusted_files",
            "eval_robustness", "misuse")  # fmt: skip


def kill_resume(work: Path, kills: int, steps: int, seed: int) -> dict:
    shards = faults.demo_shards(work / "shards")
    straight = work / "straight"
    subprocess.run(faults.train_command(shards, straight, steps), cwd=faults.REPO, check=True,
                   capture_output=True)  # fmt: skip
    # random kills land up to `budget` s into training: on average they cover half the steps
    budget = 2 * steps * faults.seconds_per_step(straight) / kills
    report = faults.kill_and_resume(shards, work / "killed", steps, kills, seed, budget)
    identical = report.completed and _same(
        faults.final_weights(straight, steps), faults.final_weights(work / "killed", steps)
    )
    return {**asdict(report), "steps": steps, "random_kill_window_s": round(budget, 2),
            "final_weights_identical": identical}  # fmt: skip


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _checkpoint_bytes(run_dir: Path) -> int:
    newest = faults.checkpoint.complete_checkpoints(run_dir / "checkpoints")[-1]
    return sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())


def disk_full(work: Path, steps: int) -> dict:
    """File-size-limit trials at several steps, a real tmpfs that fills up and a checkpoint
    directory that turns read-only (root only)."""
    shards = faults.demo_shards(work / "shards")
    trials = []
    for step in (1, 2, 4):
        run_dir = work / f"fsize_{step}"
        result = faults.starved_run(shards, run_dir, steps,
                                    faults.limit_file_size_after(run_dir, step))  # fmt: skip
        trials.append({"kind": f"RLIMIT_FSIZE after step {step}", **asdict(result),
                       "clean": result.clean})  # fmt: skip
    trials += _tmpfs_trials(work, shards, steps)
    trials += _read_only_trials(work, shards, steps)
    return {"trials": trials}


def _read_only_trials(work: Path, shards: str, steps: int) -> list[dict]:
    """Once checkpoint 2 exists, the checkpoint directory is remounted read-only (a read-only
    bind mount over itself), between two saves; the rerun gets it writable again."""
    if os.geteuid() != 0:
        return [{"kind": "read-only output", "skipped": "needs root to bind-mount"}]
    root = work / "read_only" / faults.checkpoint.CHECKPOINT_DIR

    def starve(process) -> None:
        published = root / faults.checkpoint.checkpoint_name(2)
        while not published.exists() and process.poll() is None:
            time.sleep(0.005)
        while process.poll() is None:  # stopped outside a save, so no save is cut in two
            process.send_signal(signal.SIGSTOP)
            if not any(p.name.startswith(".") for p in root.iterdir()):
                break
            process.send_signal(signal.SIGCONT)
            time.sleep(0.002)
        subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
        process.send_signal(signal.SIGCONT)

    def restore() -> None:
        subprocess.run(["umount", str(root)], check=True)

    result = faults.starved_run(shards, root.parent, steps, starve, restore)
    return [{"kind": "checkpoint directory remounted read-only after step 2", **asdict(result),
             "clean": result.clean}]  # fmt: skip


def _tmpfs_trials(work: Path, shards: str, steps: int) -> list[dict]:
    """A tmpfs sized for 2.5 checkpoints: the third save (keep=2 holds two) runs out of space."""
    if os.geteuid() != 0:
        return [{"kind": "tmpfs", "skipped": "needs root to mount a tmpfs"}]
    probe = work / "probe"
    subprocess.run(faults.train_command(shards, probe, 1), cwd=faults.REPO, check=True,
                   capture_output=True)  # fmt: skip
    size = int(2.5 * _checkpoint_bytes(probe)) + 2**20
    mount = work / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                   check=True)  # fmt: skip
    try:
        result = faults.starved_run(
            shards, mount / "run", steps, starve=lambda process: None,
            restore=lambda: subprocess.run(["mount", "-o", "remount,size=512m", str(mount)],
                                           check=True),
        )  # fmt: skip
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    return [{"kind": f"tmpfs of {size} bytes", **asdict(result), "clean": result.clean}]


def data_faults(work: Path, per_kind: int) -> dict:
    faulty = faults.faulty_shards(work / "faulty", per_kind=per_kind, shards=10, per_shard=31)
    batch = next(b for b in range(8, 0, -1) if faulty.good % b == 0)
    report = faults.train_one_pass(faulty, work / "run", batch)
    rest = Counter({faults.TRAIN_REASON[k]: n for k, n in report.left.items()
                    if faults.TRAIN_REASON.get(k)})  # fmt: skip
    verified = verify(faulty.pattern)
    subprocess.run([sys.executable, "-m", "data_tools", "reshard", faulty.pattern,
                    str(work / "re"), "--image-size", "32"], cwd=faults.REPO, check=True,
                   capture_output=True)  # fmt: skip
    resharded = Counter()
    for path in (work / "re" / "train").glob("*_stats.json"):
        resharded.update(json.loads(path.read_text())["errors"])
    manifest = json.loads((work / "re" / "train" / "manifest.json").read_text())
    resharded_duplicates = manifest["source"]["duplicate_keys"]
    items = faulty.pass_items
    return {
        "samples": items - 2,
        "good": faulty.good,
        "injected_by_kind": dict(faulty.injected),
        "rate": round(sum(faulty.injected.values()) / items, 4),
        "training": {
            "exit_code": report.exit_code,
            "batch_size": batch,
            "skipped": dict(report.skipped),
            "expected_from_items_read": dict(report.expected),
            "faults_after_last_batch": dict(rest),
            "lost": report.lost,
            "matches": report.skipped == report.expected
            and report.skipped + rest == faulty.expected(faults.TRAIN_REASON),
        },
        "verify": {"errors": dict(verified.errors), "good": verified.good,
                   "matches": verified.errors == faulty.expected(faults.VERIFY_REASON)},
        "reshard": {"errors": dict(resharded), "duplicate_keys": resharded_duplicates,
                    "matches": resharded == faulty.expected(faults.TRAIN_REASON)
                    and resharded_duplicates == faulty.injected["duplicate_key"]},
    }  # fmt: skip


def misuse(work: Path, steps: int) -> dict:
    shards = faults.demo_shards(work / "shards")
    trials = [asdict(t) for t in misuse_trials(shards, work, steps)]
    return {"steps": steps, "trials": trials}


def pytest_group(work: Path, name: str, targets: list[str], env: dict[str, str]) -> dict:
    """Run test files (the same as CI, possibly with more examples); count cases by outcome."""
    report = work / f"{name}.xml"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={report}", *targets], cwd=faults.REPO, env={**os.environ, **env},
                   capture_output=True, check=False)  # fmt: skip
    suite = ET.parse(report).getroot().find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    return {**counts, "failed": failed, "seconds": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--per-kind", type=int, default=3)
    parser.add_argument("--fuzz-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readme", action="store_true",
                        help=f"only rewrite README's table from {OUT.name}")  # fmt: skip
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help=f"run these; the others keep their figures in {OUT.name}")  # fmt: skip
    args = parser.parse_args()
    if args.readme:
        write_readme(json.loads(OUT.read_text()))
        return 0
    work = WORK / "reliability"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    kept = [name for name in SECTIONS if name not in args.sections and name in previous]
    sections = {name: previous[name] for name in kept}
    sections.update(run_sections(work, args))
    sections = {name: sections[name] for name in SECTIONS if name in sections}
    summary = summarise(sections)
    payload = {
        "benchmark": "reliability",
        "command": " ".join(["python", *sys.argv]),
        "git": git_state(),
        "machine": {**machine_info(), "note": "shared with other jobs; timings are indicative"},
        "settings": vars(args),
        "kept_from": {"sections": kept, "commit": previous.get("git", {}).get("commit")}
        if kept
        else None,
        "summary": summary,
        "seconds": round(time.monotonic() - started, 1),
        **sections,
    }
    write_results(OUT, payload)
    write_readme(payload)
    for key, value in summary.items():
        print(f"{key:<28} {value}")
    print(f"wrote {OUT.relative_to(faults.REPO)}")
    return 0 if summary["all_passed"] else 1


def run_sections(work: Path, args) -> dict:
    runs = {
        "kill_resume": lambda: kill_resume(work / "kill", args.kills, args.steps, args.seed),
        "disk_full": lambda: disk_full(work / "disk", 8),
        "data_faults": lambda: data_faults(work / "data", args.per_kind),
        "misuse": lambda: misuse(work / "misuse", 6),
    }
    env = {"VLP_FUZZ_EXAMPLES": str(args.fuzz_examples), "PYTHONPATH": str(faults.REPO)}
    tests = {"bad_input": ["tests/reliability/test_bad_input_fuzz.py"],
             "untrusted_files": ["tests/reliability/test_untrusted_files.py"],
             "eval_robustness": ["tests/eval/test_eval_bad_input.py"]}  # fmt: skip
    for name, targets in tests.items():
        runs[name] = lambda name=name, targets=targets: pytest_group(work, name, targets, env)
    return {name: runs[name]() for name in args.sections}


README = faults.REPO / "README.md"
MARKERS = ("<!-- RELIABILITY:START -->\n", "<!-- RELIABILITY:END -->")


def write_readme(payload: dict) -> None:
    """The README's reliability table, between its markers, from a results payload."""
    text = README.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    README.write_text(text[:start] + readme_table(payload) + text[end:])


def readme_table(p: dict) -> str:
    kill, data, summary = p["kill_resume"], p["data_faults"], p["summary"]
    disk = [t for t in p["disk_full"]["trials"] if "skipped" not in t]
    kinds = ", ".join(f"{k} {n}" for k, n in data["injected_by_kind"].items())
    groups = summary["cases_bad_input_untrusted_eval"]
    rows = [
        ("SIGKILL at random moments of training and during checkpoint writes/deletions",
         f"{kill['kills']} kills ({kill['kills_while_saving']} with a checkpoint being written "
         f"or deleted) in one {kill['steps']}-step run",
         f"run completed; {summary['resumes_from_latest']} restarts resumed from the newest "
         f"complete checkpoint; final weights bitwise equal to the uninterrupted run: "
         f"{kill['final_weights_identical']}"),
        ("checkpoint write fails (file-size limit mid-run; a tmpfs that fills up; the "
         "checkpoint directory turns read-only)",
         f"{len(disk)} runs",
         f"{summary['disk_full_clean_stops']} stopped with one line naming the intact "
         f"checkpoint; {sum(t['resumed'] for t in disk)}/{len(disk)} continued when space was "
         "back"),
        (f"bad samples in {data['samples']} samples + shard faults",
         kinds,
         f"skip counts by reason equal the injected faults: {summary['skip_counts_match']} "
         "(training, `vlp-shard reshard` and `verify`; long captions are truncated and trained, "
         "duplicate keys trained and counted by `reshard` and `verify`, as designed)"),
        ("bad config, override, YAML and CLI values (hypothesis)",
         f"{p['settings']['fuzz_examples']} examples per property", groups["bad_input"]),
        ("pickle payloads in weights/checkpoints; tar names with `/` or `..`", "",
         groups["untrusted_files"] + " (no payload ran, nothing written outside)"),
        ("eval: wrong `--model`, missing classnames, empty split, ...", "",
         groups["eval_robustness"]),
        ("misuse: a fresh start on a finished run, a resume with a changed data stream or "
         "changed settings, a second writer meanwhile, `--overwrite`",
         f"{len(p['misuse']['trials'])} trials",
         f"as documented: {summary['misuse_as_documented']} (refused or warned in one line; "
         f"`--overwrite` moved the old run aside); records lost: {summary['records_lost']}, "
         f"checkpoints lost: {summary['checkpoints_lost']}"),
    ]  # fmt: skip
    lines = ["| Fault | Injected | Outcome |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    trials = summary["trials_run"]
    lines.append(
        f"\nTrials: {trials['kill_resume_starts']} starts of the killed run, "
        f"{trials['disk_full_runs']} disk-full runs, {trials['data_fault_passes']} data-fault "
        f"pass, {trials['input_and_file_cases']} input and file cases, "
        f"{trials['misuse_trials']} misuse trials. Runs completed: "
        f"**{summary['runs_completed']}/{summary['runs_started']}**."
    )
    kept = p.get("kept_from") or {}
    earlier = (f" ({', '.join(n for n in SECTIONS if n not in kept['sections'])}; the others "
               f"from commit {(kept['commit'] or '?')[:10]})") if kept else ""  # fmt: skip
    lines.append(
        f"Samples lost: **{summary['samples_lost']}**. Checkpoints corrupted: "
        f"**{summary['checkpoints_corrupted']}**. Records lost: **{summary['records_lost']}**. "
        f"Commit {p['git'].get('commit', '?')[:10]}{earlier}, {p['machine']['cores']} shared "
        "CPU cores."
    )
    return "\n".join(lines) + "\n"


def summarise(s: dict) -> dict:
    kill, disk, data = s["kill_resume"], s["disk_full"]["trials"], s["data_faults"]
    ran_disk = [t for t in disk if "skipped" not in t]
    misused = s["misuse"]["trials"]
    groups = [s["bad_input"], s["untrusted_files"], s["eval_robustness"]]
    injected = {f"data: {k}": n for k, n in data["injected_by_kind"].items()}
    summary = {
        "trials_run": {
            "kill_resume_starts": kill["kills"] + 1,
            "disk_full_runs": len(ran_disk),
            "data_fault_passes": 1,
            "input_and_file_cases": sum(g["tests"] for g in groups),
            "misuse_trials": len(misused),
        },
        "faults_injected_by_kind": {
            "SIGKILL": kill["kills"],
            "SIGKILL while a checkpoint was being written or deleted": kill["kills_while_saving"],
            "output full or not writable": len(ran_disk),
            **injected,
        },
        "runs_completed": int(kill["completed"]) + sum(t["resumed"] for t in ran_disk)
        + int(data["training"]["exit_code"] == 0),
        "runs_started": 1 + len(ran_disk) + 1,
        "resumes_from_latest": f"{kill['resumed_at_latest']}/{kill['starts_with_checkpoint']}",
        "final_weights_identical": kill["final_weights_identical"],
        "samples_lost": data["training"]["lost"],
        "checkpoints_corrupted": len(kill["corrupt_latest"])
        + sum(len(t["latest_problems"]) for t in ran_disk),
        "disk_full_clean_stops": f"{sum(t['clean'] for t in ran_disk)}/{len(ran_disk)}",
        "misuse_as_documented": f"{sum(t['as_documented'] for t in misused)}/{len(misused)}",
        "records_lost": sum(t["records_lost"] for t in misused),
        "checkpoints_lost": sum(t["checkpoints_lost"] for t in misused),
        "skip_counts_match": data["training"]["matches"] and data["verify"]["matches"]
        and data["reshard"]["matches"],
        "cases_bad_input_untrusted_eval": {
            name: f"{g['tests'] - g['failures'] - g['errors']}/{g['tests']} passed"
            for name, g in zip(("bad_input", "untrusted_files", "eval_robustness"), groups,
                               strict=True)
        },
    }  # fmt: skip
    summary["all_passed"] = (
        kill["completed"] and kill["final_weights_identical"] and kill["kills"] >= 20
        and kill["resumed_at_latest"] == kill["starts_with_checkpoint"]
        and summary["samples_lost"] == 0 and summary["checkpoints_corrupted"] == 0
        and all(t["clean"] and t["resumed"] for t in ran_disk) and summary["skip_counts_match"]
        and all(g["failures"] == g["errors"] == 0 for g in groups)
        and all(t["as_documented"] for t in misused)
    )  # fmt: skip
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
