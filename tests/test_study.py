"""vlp-study: study-file checks, interval math against scipy, and a 2-variant x 2-seed micro-study
that is killed mid-run, started again, and must finish without training any run twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from vlp import runlock
from vlp.study.cli import LOCK_NAME, main
from vlp.study.report import ONE_SEED, estimate_cell
from vlp.study.spec import load_study
from vlp.study.stats import mean_interval, paired_difference

REPO = Path(__file__).resolve().parents[1]
STEPS = 10
SEEDS = [0, 1]
VARIANTS = {"base": [], "fast": ["train.lr=3e-3"]}


# ---- interval math


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_mean_interval_matches_scipy_t(n):
    values = list(np.random.default_rng(n).normal(0.4, 0.1, n))
    low, high = stats.t.interval(0.95, df=n - 1, loc=np.mean(values), scale=stats.sem(values))
    estimate = mean_interval(values)
    assert estimate.n == n and estimate.mean == pytest.approx(np.mean(values), rel=1e-12)
    assert (estimate.low, estimate.high) == pytest.approx((low, high), rel=1e-9)


def test_paired_difference_matches_scipy_ttest_rel_on_shared_seeds():
    rng = np.random.default_rng(0)
    base = {seed: float(v) for seed, v in enumerate(rng.normal(0.5, 0.1, 5))}
    variant = {
        seed: base.get(seed, 0.5) + float(rng.normal(0.05, 0.02)) for seed in (1, 2, 3, 4, 9)
    }
    shared = [1, 2, 3, 4]  # seed 0 lacks a variant run, seed 9 a baseline run
    a, b = [variant[s] for s in shared], [base[s] for s in shared]
    expected = stats.ttest_rel(a, b).confidence_interval(0.95)
    estimate = paired_difference(variant, base)
    assert estimate.n == 4
    assert (estimate.low, estimate.high) == pytest.approx(tuple(expected), rel=1e-9)
    assert paired_difference({7: 1.0}, base) is None


def test_one_seed_has_no_interval_and_the_table_says_so():
    estimate = mean_interval([0.25])
    assert estimate.half_width is None and estimate.low is None
    assert estimate_cell(estimate.to_dict()) == f"0.250 {ONE_SEED}"
    assert estimate_cell(mean_interval([0.2, 0.3]).to_dict()).startswith("0.250 ± ")


# ---- study files


def _write_study(folder: Path, **fields) -> Path:
    study = {
        "config": str(REPO / "configs" / "demo.yaml"),
        "overrides": ["data.train_shards=x.tar"],
        "variants": {"base": [], "fast": ["train.lr=3e-3"]},
        "baseline": "base",
        "seeds": [0, 1],
        "output_dir": str(folder / "out"),
        **fields,
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in study.items() if v is not None}))
    return path


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"variant": {"a": []}}, "unknown key 'variant'; did you mean variants?"),
        ({"baseline": None}, "baseline: required, but not set"),
        ({"baseline": "clip"}, "baseline: 'clip' is not a variant (base, fast)"),
        ({"variants": {"base": [], "fast": ["train.lr_x=1"]}},
         "variant fast: unknown config key 'train.lr_x'; did you mean train.lr?"),
        ({"variants": {"base": [], "fast": ["train.lr"]}}, "'train.lr' must look like key=value"),
        ({"overrides": ["train.seed=3"]}, "train.seed is set by vlp-study for every run"),
        ({"seeds": [0, 0]}, "seeds: must be a list of distinct integers"),
        ({"seeds": []}, "seeds: must be a list of distinct integers"),
        ({"variants": {"a b": []}, "baseline": "a b"}, "name 'a b' must start with a letter"),
        ({"config": "nope.yaml"}, "config: nope.yaml: no such run config file"),
        ({"eval": {"s": {"every_step": 1}}}, "unknown config key 'eval.s.every_step'"),
        ({"score": {"p": ["python", "x.py"]}}, "score.p: the command must write its JSON to"),
    ],
)  # fmt: skip
def test_study_file_mistakes_are_one_line_and_exit_2(tmp_path, capsys, fields, message):
    code = main([str(_write_study(tmp_path, **fields)), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith(f"vlp-study: error: {tmp_path / 'study.yaml'}: ")


def test_invalid_yaml_and_missing_eval_set_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: [\n")
    assert main([str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    study = _write_study(tmp_path, eval={"shapes": {"dataset": str(tmp_path / "gone")}})
    assert main([str(study)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "eval.shapes.dataset" in err
    assert not (tmp_path / "out").exists(), "nothing is written before the checks pass"


def test_a_directory_that_is_not_this_studys_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("")
    assert main([str(_write_study(tmp_path)), "--dry-run"]) == 2
    assert "holds no plan.json, so it is not this study's directory" in capsys.readouterr().err


def test_a_study_directory_in_use_is_refused_with_one_line(tmp_path, capsys):
    eval_set = tmp_path / "set"
    eval_set.mkdir()
    (eval_set / "dataset_type.txt").write_text("classification\n")
    study = _write_study(tmp_path, eval={"shapes": {"dataset": str(eval_set)}})
    with runlock.acquire(tmp_path / "out", "vlp-study", LOCK_NAME):
        assert main([str(study)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is in use by vlp-study (pid" in err, err
    assert not (tmp_path / "out" / "plan.json").exists()


def test_groups_multiply_and_runs_go_seed_by_seed(tmp_path):
    groups = [{"demo": ["data.batch_size=8"], "fm": ["data.batch_size=16"]},
              {"d32": ["train.lr=1e-3"], "d64": ["train.lr=2e-3"]}]  # fmt: skip
    study = load_study(_write_study(tmp_path, groups=groups))
    assert list(study.groups) == ["demo-d32", "demo-d64", "fm-d32", "fm-d64"]
    assert study.groups["fm-d64"] == ["data.batch_size=16", "train.lr=2e-3"]
    names = [(r.seed, r.group, r.variant) for r in study.runs]
    assert names[:3] == [(0, "demo-d32", "base"), (0, "demo-d32", "fast"), (0, "demo-d64", "base")]
    assert len(names) == 16 and names[8][0] == 1
    run = study.runs[-1]
    assert run.run_dir == tmp_path / "out" / "runs" / "fm-d64" / "fast" / "seed_1"
    assert (run.config.data.batch_size, run.config.train.lr, run.config.train.seed) == (16, 3e-3, 1)
    assert run.config.resume == "latest" and run.config.run.output_dir == str(run.run_dir)


def test_the_study_eval_section_replaces_the_base_evaluators(tmp_path):
    study = load_study(_write_study(tmp_path, eval={"s": {"dataset": "sets/s", "every_steps": 5}}))
    evaluators = study.runs[0].config.eval
    assert evaluators["s"].dataset == "sets/s" and evaluators["s"].every_steps == 5
    for name in ("shapes", "retrieval"):  # configs/demo.yaml's own, switched off
        assert (evaluators[name].every_steps, evaluators[name].at_end) == (0, False)


def _fake_finished_run(run, acc1: dict[int, float], attempts: list[tuple[float, float]]) -> None:
    """What a finished run leaves: its final checkpoint, metrics records, attempt times."""
    steps = run.config.train.steps
    (run.run_dir / "checkpoints" / f"step_{steps:09d}").mkdir(parents=True)
    (run.run_dir / "checkpoints" / f"step_{steps:09d}" / "meta.json").write_text("{}")
    records = [{"step": step, "eval/s/acc1": value} for step, value in acc1.items()]
    records.insert(1, {"step": steps, "loss/total": 1.0})
    lines = [json.dumps(r) for r in records] + ['{"step": 9, "eval/s/ac']  # cut by a kill
    (run.run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    times = [{"started": a, "pid": 1} for a, _ in attempts]
    ends = [{"ended": b, "exit": 0} for _, b in attempts]
    text = "".join(json.dumps(r) + "\n" for pair in zip(times, ends, strict=True) for r in pair)
    (run.run_dir / "study-attempts.jsonl").write_text(text)


def test_results_from_what_runs_wrote_with_a_failed_score_and_one_shared_seed(tmp_path):
    from vlp.study.report import markdown
    from vlp.study.results import run_record, summarize

    command = ["{python}", "score.py", "{output}"]
    study = load_study(
        _write_study(tmp_path, overrides=["data.train_shards=x.tar", "train.steps=4",
                     "data.batch_size=2", "train.grad_accum=3"], score={"p": command})
    )  # fmt: skip
    runs = {(r.variant, r.seed): r for r in study.runs}
    _fake_finished_run(runs["base", 0], {2: 0.1, 4: 0.2}, [(0.0, 5.0), (9.0, 12.0)])
    _fake_finished_run(runs["base", 1], {2: 0.2, 4: 0.4}, [(0.0, 7.0)])
    _fake_finished_run(runs["fast", 0], {2: 0.3, 4: 0.5}, [(0.0, 6.0)])
    (runs["base", 0].run_dir / "scores").mkdir()
    (runs["base", 0].run_dir / "scores" / "p.json").write_text('{"metrics": {"x": 2}}')
    records = [run_record(study, run) for run in study.runs]
    assert [r["finished"] for r in records] == [True, True, True, False]  # fast seed 1: not
    assert records[0]["final"] == {"s/acc1": 0.2, "p/x": 2.0, "wall/seconds": 8.0}
    assert records[0]["curves"]["s/acc1"] == [[12, 0.1], [24, 0.2]]  # step x 2 x 3 samples
    assert records[0]["attempts"] == 2 and "p/x" not in records[1]["final"]  # its score failed
    payload = summarize(study, records, 1.0)
    acc1 = payload["results"][""]["s/acc1"]
    assert acc1["variants"]["base"]["n"] == 2 and acc1["variants"]["fast"]["low"] is None
    assert acc1["differences"]["fast"] == {"n": 1, "mean": pytest.approx(0.3), "low": None,
                                           "high": None}  # fmt: skip
    assert payload["results"][""]["p/x"]["variants"]["base"]["n"] == 1
    text = markdown(payload, [])
    assert "| acc1 | 0.300 ± " in text and f"| 0.500 {ONE_SEED} | +0.300 {ONE_SEED} |" in text
    assert "| fast seed 1 | not finished |" in text


# ---- a micro-study: killed mid-run, started again


def _study_command(study: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlp.study", str(study), *extra]


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict:
    """Tiny shards, a 2 x 2 study, one start killed in run 2, then a full second start."""
    root = tmp_path_factory.mktemp("study")
    subprocess.run(
        [sys.executable, "-m", "data_tools", "demo", str(root / "data"), "--num-samples", "64",
         "--samples-per-shard", "16", "--image-size", "32", "--eval-samples", "8"],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    base = root / "base.yaml"
    base.write_text((REPO / "configs" / "demo.yaml").read_text())
    # a score command: metric x = the run's seed
    score = (
        "import json,sys; json.dump({'metrics':{'x':float(sys.argv[2])}}, open(sys.argv[1],'w'))"
    )
    study = root / "micro.yaml"
    study.write_text(yaml.safe_dump({
        "config": str(base),
        "overrides": [
            "model.name=vlp-tiny-clip", "objectives.caption.weight=0",
            f"data.train_shards={root}/data/train/{{00000..00003}}.tar", "data.batch_size=8",
            "data.workers=0", "data.shuffle_buffer=16", f"train.steps={STEPS}",
            "train.warmup_steps=1", "train.log_every_steps=2", "checkpoint.every_steps=2",
            "run.trackers=[]",
        ],
        "variants": VARIANTS,
        "baseline": "base",
        "seeds": SEEDS,
        "eval": {name: {"dataset": str(root / "data" / "eval" / name), "every_steps": 5}
                 for name in ("shapes", "retrieval")},
        "score": {"const": ["{python}", "-c", score, "{output}", "{seed}"]},
        "prepare": [["{python}", "-c", f"open({str(root / 'prepared')!r}, 'a').write('x')"]],
        "headline": ["shapes/acc1", "retrieval/gap"],
        "output_dir": str(root / "out"),
    }))  # fmt: skip
    out = root / "out"
    first = _start_and_kill(study, out / "runs" / "fast" / "seed_0")
    logs = out.glob("runs/*/*/study-attempts.jsonl")
    attempts = {log.parent: _attempt_starts(log.parent) for log in logs}
    report = subprocess.run(_study_command(study, "--report"), cwd=REPO, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    after = {run_dir: _attempt_starts(run_dir) for run_dir in attempts}
    first["report"], first["attempts"] = report, (attempts, after)
    written = out / "study.json"
    first["partial"] = json.loads(written.read_text()) if report.returncode == 0 else {}
    second = subprocess.run(
        _study_command(study, "--jobs", "2"), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    return {"root": root, "study": study, "base": base, "out": out, "first": first,
            "second": second}  # fmt: skip


def _start_and_kill(study: Path, victim: Path) -> dict:
    """Start the study; SIGKILL it (it alone) once `victim` has a checkpoint but is unfinished."""
    log = study.with_suffix(".first.log")
    with log.open("w") as handle:
        process = subprocess.Popen(_study_command(study), cwd=REPO, stderr=handle)
    final = victim / "checkpoints" / f"step_{STEPS:09d}" / "meta.json"
    deadline = time.monotonic() + 600
    while not list(victim.glob("checkpoints/step_*/meta.json")):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the second run never saved a checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_mid_run = not final.exists()
    trainer = json.loads((victim / "study-attempts.jsonl").read_text().splitlines()[-1])["pid"]
    deadline = time.monotonic() + 60
    while _alive(trainer):  # the kernel kills it with its parent (PR_SET_PDEATHSIG)
        assert time.monotonic() < deadline, "the killed study's trainer outlived it"
        time.sleep(0.1)
    return {"killed_mid_run": killed_mid_run, "stderr": log.read_text()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by init) counts as dead
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")


def _attempt_starts(run_dir: Path) -> int:
    lines = (run_dir / "study-attempts.jsonl").read_text().splitlines()
    return sum("started" in json.loads(line) for line in lines)


@pytest.mark.slow
def test_report_writes_the_finished_runs_of_a_stopped_study_and_trains_nothing(micro):
    first = micro["first"]
    assert first["report"].returncode == 0, first["report"].stderr[-2000:]
    partial = first["partial"]
    assert partial["runs_total"] == 4 and 1 <= partial["runs_finished"] < 4
    assert sum(r["finished"] for r in partial["runs"]) == partial["runs_finished"]
    before, after = first["attempts"]
    assert before and before == after  # --report started no training
    assert "prepare" not in first["report"].stderr  # nor the prepare commands


@pytest.mark.slow
def test_killed_study_finishes_without_training_any_run_twice(micro):
    second, out = micro["second"], micro["out"]
    assert micro["first"]["killed_mid_run"], "the kill landed after the second run finished"
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 runs, 1 finished before; 2 at once" in second.stderr
    runs = {(v, s): out / "runs" / v / f"seed_{s}" for v in VARIANTS for s in SEEDS}
    starts = {key: _attempt_starts(run_dir) for key, run_dir in runs.items()}
    assert starts == {("base", 0): 1, ("fast", 0): 2, ("base", 1): 1, ("fast", 1): 1}
    resumed = re.findall(
        r"resumed from \S+ at step (\d+)", (runs["fast", 0] / "study.log").read_text()
    )
    assert len(resumed) == 1 and 2 <= int(resumed[0]) < STEPS
    for run_dir in runs.values():
        assert (run_dir / "checkpoints" / f"step_{STEPS:09d}" / "meta.json").is_file()
        assert (run_dir / "scores" / "const.json").is_file()
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # --jobs 2: cores // 2 each
    config = yaml.safe_load((runs["fast", 1] / "config.yaml").read_text())
    assert config["train"]["threads"] == threads
    assert (micro["root"] / "prepared").read_text() == "xx", "prepare runs at every start"


def _final_evals(run_dir: Path) -> dict[str, float]:
    final = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["step"] == STEPS:
            final.update({k[5:]: v for k, v in record.items() if k.startswith("eval/")})
    return final


@pytest.mark.slow
def test_micro_study_table_is_the_runs_metrics_with_scipy_intervals(micro):
    out = micro["out"]
    payload = json.loads((out / "study.json").read_text())
    finals = {(v, s): _final_evals(out / "runs" / v / f"seed_{s}") for v in VARIANTS for s in SEEDS}
    metrics = list(finals["base", 0])
    assert {"shapes/acc1", "retrieval/gap", "retrieval/image_retrieval_recall@1"} <= set(metrics)
    results = payload["results"][""]
    assert set(results) == {*metrics, "const/x", "wall/seconds"}
    for metric in [*metrics, "const/x"]:
        for variant in VARIANTS:
            values = [
                float(s) if metric == "const/x" else finals[variant, s][metric] for s in SEEDS
            ]
            got = results[metric]["variants"][variant]
            assert got["n"] == 2 and got["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            if np.std(values) > 0:
                low, high = stats.t.interval(0.95, 1, loc=np.mean(values), scale=stats.sem(values))
                assert (got["low"], got["high"]) == pytest.approx((low, high), rel=1e-9)
        diffs = [finals["fast", s][metric] - finals["base", s][metric] for s in SEEDS] if (
            metric != "const/x") else [0.0, 0.0]  # fmt: skip
        assert results[metric]["differences"]["fast"]["mean"] == pytest.approx(np.mean(diffs))
    markdown = (out / "study.md").read_text()
    acc1 = results["shapes/acc1"]
    row = (f"| acc1 | {estimate_cell(acc1['variants']['base'])} | "
           f"{estimate_cell(acc1['variants']['fast'])} | "
           f"{estimate_cell(acc1['differences']['fast'], signed=True)} |")  # fmt: skip
    assert row in markdown
    assert "| base seed 0 | " in markdown and "## Summary" in markdown
    curve = payload["runs"][0]["curves"]["shapes/acc1"]
    assert [samples for samples, _ in curve] == [5 * 8, 10 * 8]  # steps 5, 10 of batch 8
    for name in ("shapes-final", "shapes-curves", "retrieval-curves", "const-final"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0


@pytest.mark.slow
def test_a_changed_study_or_base_config_is_refused_with_one_line(micro):
    study, base = micro["study"], micro["base"]
    original_study, original_base = study.read_text(), base.read_text()
    changed_study, changed_base = yaml.safe_load(original_study), yaml.safe_load(original_base)
    changed_study["seeds"].append(2)
    changed_base["train"]["lr"] *= 2
    try:
        study.write_text(yaml.safe_dump(changed_study))
        result = subprocess.run(_study_command(study), cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert "changed since" in result.stderr and "(seeds differ)" in result.stderr
        study.write_text(original_study)
        base.write_text("# a comment changes nothing\n" + original_base)
        assert main([str(study), "--dry-run"]) == 0
        base.write_text(yaml.safe_dump(changed_base))
        result = subprocess.run(_study_command(study), cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert "config's content differ" in result.stderr
    finally:
        study.write_text(original_study)
        base.write_text(original_base)


SHIPPED = [p for p in sorted((REPO / "studies").glob("*.yaml")) if "\nvariants:" in p.read_text()]
"""Study files (the others are their base run configs, resolved through them)."""


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_study_files_and_their_run_configs_resolve(path, monkeypatch):
    monkeypatch.chdir(REPO)  # study files name their configs relative to the repository
    study = load_study(path.relative_to(REPO))
    assert study.baseline in study.variants and len(study.seeds) >= 3
    assert len(study.runs) == len(study.seeds) * len(study.variants) * len(study.groups)
