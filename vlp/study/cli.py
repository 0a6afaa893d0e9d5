"""`vlp-study STUDY.yaml [--jobs N] [--output DIR] [--dry-run]` (also `python -m vlp.study`).

Runs every (group, variant, seed) of a study file as an ordinary vlp training run in its own
directory (STUDY_DIR/runs/...), then writes STUDY_DIR/study.json, study.md and figures/. Run it
again after a kill: finished runs are skipped and an interrupted one resumes from its last
checkpoint. A study directory remembers the study it was started with (plan.json) and refuses
a changed one. Exit codes: 0 done, 1 a run or command failed, 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from vlp import distributed, runlock
from vlp.data import format as fmt
from vlp.study.spec import Study, StudyError, load_study

PROG = "vlp-study"
LOCK_NAME = "study"
PLAN_FILE = "plan.json"
STUDY_JSON, STUDY_MD = "study.json", "study.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a study file (YAML; docs/study.md)")
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N",
        help="runs at once, each with (cores // N) CPU threads (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=Path, metavar="DIR",
        help="study directory (default: the file's output_dir, else runs/studies/<file stem>)",
    )  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true", help="check the study file, list its runs, train none"
    )
    parser.add_argument(
        "--report", action="store_true",
        help="write study.json, study.md and figures from the runs finished so far, train none",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, not {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    try:
        study = load_study(args.study, args.output)
        check_record(study)
        if args.dry_run:
            return list_runs(study)
        if args.report:
            return report_finished(study, started)
        return run_study(study, args.jobs, started)
    except (StudyError, runlock.Busy) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def check_record(study: Study) -> None:
    """The study directory must be new, or hold this very study (its plan.json)."""
    plan = study.output_dir / PLAN_FILE
    if plan.is_file():
        recorded = json.loads(plan.read_text())
        if recorded != study.record:
            keys = sorted(k for k in recorded.keys() | study.record.keys()
                          if recorded.get(k) != study.record.get(k))  # fmt: skip
            what = ", ".join("config's content" if k == "config_sha256" else k for k in keys)
            raise StudyError(
                f"{study.path}: changed since {study.output_dir} was started ({what} differ); "
                f"restore it, or pass --output NEW_DIR for a new study"
            )
    elif study.output_dir.exists() and any(
        path != runlock.lock_path(study.output_dir, LOCK_NAME)
        for path in study.output_dir.iterdir()
    ):
        raise StudyError(
            f"{study.output_dir}: exists but holds no {PLAN_FILE}, so it is not this study's "
            "directory; pass --output NEW_DIR"
        )


def list_runs(study: Study) -> int:
    from vlp.study.runner import is_finished

    for run in study.runs:
        state = "finished" if is_finished(run) else "to train"
        print(f"{run.name}: {state}: {run.run_dir}")
        print(f"    {' '.join(run.overrides)}")
    return 0


def run_study(study: Study, jobs: int, started: float) -> int:
    from vlp.study import results, runner

    code = runner.run_prepare(study, say)
    if code != 0:
        return 2 if code == 2 else 1
    check_eval_sets(study)
    # one vlp-study per study directory (each run locks its own run directory too); the lock
    # fd is close-on-exec, so the training processes never hold it
    advice = "wait for it to finish, or pass --output NEW_DIR"
    with runlock.acquire(study.output_dir, PROG, LOCK_NAME, advice):
        check_record(study)  # again, now that no other vlp-study can write it
        results.write_json(study.output_dir / PLAN_FILE, study.record)
        return _train_and_report(study, jobs, started)


def report_finished(study: Study, started: float) -> int:
    """The study's outputs from its finished runs, while (or instead of) training the rest."""
    from vlp.study import report, results

    if not (study.output_dir / PLAN_FILE).is_file():
        raise StudyError(f"{study.output_dir}: no run of this study has started; nothing to report")
    records = [results.run_record(study, run) for run in study.runs]
    write_outputs(study, results.summarize(study, records, time.time() - started), report, results)
    return 0


def _train_and_report(study: Study, jobs: int, started: float) -> int:
    from vlp.study import report, results, runner

    threads = max(1, distributed.cpu_cores() // jobs)
    pending = runner.plan_jobs(study, threads)
    done = len(study.runs) - len(pending)
    say(f"{len(study.runs)} runs, {done} finished before; {jobs} at once, {threads} threads each")
    signal.signal(signal.SIGTERM, _interrupt)
    failed = runner.run_jobs(pending, jobs, say)
    records = [results.run_record(study, run) for run in study.runs]
    payload = results.summarize(study, records, time.time() - started)
    write_outputs(study, payload, report, results)
    for job in failed:
        say(f"failed: {job.run.name}: {job.failure}")
    return 1 if failed else 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # stops the running commands on the way out (runner.run_jobs)


def check_eval_sets(study: Study) -> None:
    """Every evaluator a run will use must find its set: the trainer would only warn."""
    for run in study.runs:
        for name, entry in run.config.eval.items():
            if (entry.every_steps or entry.at_end) and not (
                Path(entry.dataset) / fmt.DATASET_TYPE_FILE
            ).is_file():
                raise StudyError(
                    f"{study.path}: {run.name}: eval.{name}.dataset {entry.dataset} is not an "
                    "eval set (no dataset_type.txt); build it (vlp-shard) or fix the path"
                )


def write_outputs(study: Study, payload: dict, report, results) -> None:
    out = study.output_dir
    figures = report.write_figures(payload, out / report.FIGURES_DIR)
    results.write_json(out / STUDY_JSON, payload)
    (out / STUDY_MD).write_text(report.markdown(payload, figures))
    say(f"wrote {out / STUDY_JSON}, {out / STUDY_MD} and {len(figures)} figures")
    if study.results_dir is not None:
        target = study.results_dir
        shutil.rmtree(target / report.FIGURES_DIR, ignore_errors=True)
        shutil.copytree(out / report.FIGURES_DIR, target / report.FIGURES_DIR)
        for name in (STUDY_JSON, STUDY_MD):
            shutil.copyfile(out / name, target / name)
        say(f"copied them to {target}")
