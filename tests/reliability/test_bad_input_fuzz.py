"""Bad configuration and command-line input, fuzzed: every case is one error line naming the
key, option or value, exit code 2, and never a traceback or a hang."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from data_tools.cli import main as shard_main
from eval.cli import main as eval_main
from tests.reliability.faults import REPO
from vlp.config import Config, ConfigError, EvalConfig, _all_keys, load_config
from vlp.train import main as train_main

KEYS = _all_keys(OmegaConf.to_container(OmegaConf.structured(Config), resolve=False))
KEYS += [f"eval.shapes.{k}" for k in OmegaConf.structured(EvalConfig)]
EXAMPLES = int(os.environ.get("VLP_FUZZ_EXAMPLES", "150"))
"""bench/reliability.py raises it for the full run."""
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
FUZZ_TRAIN = settings(FUZZ, max_examples=max(40, EXAMPLES // 4))

values = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "", "[]", "{}", "[1, 2]", "{a: 1}", "null", "true",
                     "${nope}", "${oc.env:NOPE_NOT_SET}", "'", "[", "{", "0x10", "1e999",
                     "[{shards: a, weight: -1}]", "${train.lr}"]),
)  # fmt: skip
keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k + ".0.x"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0123456789/", min_size=1, max_size=20),
)


def _names(message: str, key: str, value: str) -> bool:
    """The message points at the mistake: the key (or one of its parts) or the value."""
    parts = [p for p in key.replace("/", ".").split(".") if p] or [key]
    return any(p in message for p in parts) or (value.strip() != "" and value in message)


@FUZZ
@given(keys, values)
def test_any_override_loads_or_is_one_line_naming_it(key, value):
    try:
        load_config(REPO / "configs" / "demo.yaml", [f"{key}={value}"])
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and _names(message, key, value), message


@FUZZ_TRAIN
@given(keys, values)
def test_vlp_train_exits_2_with_one_line_for_any_rejected_override(key, value):
    override = f"{key}={value}"
    try:
        load_config(REPO / "configs" / "demo.yaml", [override])
        assume(False)  # a valid config would start training: not this test's business
    except ConfigError:
        pass
    _check_one_line(
        lambda: train_main(["--config", "configs/coca_demo.yaml", override]), "vlp-train"
    )


@FUZZ_TRAIN
@given(st.text(max_size=200))
def test_vlp_train_any_yaml_file_is_loaded_or_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text)
    try:
        load_config(path, ["data.train_shards=x.tar"])
        assume(False)
    except ConfigError as err:
        message = str(err)  # the file, or (a value the schema rejects) the key it holds
        assert "\n" not in message, message
        assert str(path) in message or message.split(".")[0].split(":")[0] in text, message


def _check_one_line(run, prog: str, capsys=None) -> str:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run()
    text = err.getvalue()
    errors = [line for line in text.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in text, text[-1500:]
    return errors[0]


bad_ints = st.one_of(
    st.integers(max_value=0).map(str),
    st.sampled_from(["x", "1.5", "nan", "", "--", "1e3", "0x", "99999999999999999999999"]),
)
SHARD_OPTIONS = ["--samples-per-shard", "--workers", "--num-nodes", "--image-size", "--quality",
                 "--max-pixels", "--num-samples", "--eval-samples", "--node-rank", "--seed",
                 "--format", "--resize-mode"]  # fmt: skip


@FUZZ
@given(st.sampled_from(SHARD_OPTIONS), bad_ints)
def test_vlp_shard_bad_option_values_are_one_line_exit_2(tmp_path_factory, option, value):
    if option in ("--seed", "--max-pixels") and value.isdigit():
        assume(int(value) == 0 and option == "--max-pixels")  # any other size or seed is valid
    if option == "--node-rank" and value.isdigit():
        assume(int(value) > 0)  # the only valid rank of one node is 0
    if option == "--image-size" and value.isdigit():
        assume(not 8 <= int(value) <= 16384)
    out = tmp_path_factory.mktemp("o")
    argv = ["demo", str(out), "--num-samples", "1", "--eval-samples", "1", option, value]
    line = _check_one_line(lambda: _exit_code(shard_main, argv), "vlp-shard")
    assert option in line or value in line, line
    assert not (out / "train").exists()


@FUZZ
@given(st.sampled_from(["--batch-size", "--workers", "--faiss-threshold", "--recall-k",
                        "--device", "--precision", "--task", "--retrieval-method"]),
       bad_ints)  # fmt: skip
def test_vlp_eval_bad_option_values_are_one_line_exit_2(tmp_path_factory, option, value):
    if option == "--workers":
        assume(not value.isdigit() and value != "0")  # 0 decodes in the main process
    directory = tmp_path_factory.mktemp("e")
    line = _check_one_line(lambda: _exit_code(eval_main, ["--checkpoint", str(directory),
                           "--dataset", str(directory), option, value]), "vlp-eval")  # fmt: skip
    assert option in line or value in line or str(directory) in line, line


def _exit_code(main, argv: list[str]) -> int:
    """argparse exits through SystemExit; the apps return their code."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize(
    "argv",
    [
        ["vlp/train.py", "--config", "configs/coca_demo.yaml", "data.sources.0.shards=x"],
        ["-m", "data_tools", "demo", "/tmp/x", "--image-size", "99999999999999999999999"],
        ["-m", "eval", "--checkpoint", "/nonexistent", "--dataset", "/nonexistent"],
    ],
)
def test_fresh_processes_end_in_one_line_without_hanging(argv):
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-1500:]
    assert "Traceback" not in result.stderr


# --- study files and run-directory states ----------------------------------------------------


@FUZZ
@given(st.text(max_size=300))
def test_vlp_study_any_study_file_is_checked_or_one_line_exit_2(tmp_path_factory, text):
    from vlp.study.cli import main as study_main

    directory = tmp_path_factory.mktemp("study")
    path = directory / "s.yaml"
    path.write_text(text)
    argv = [str(path), "--dry-run", "--output", str(directory / "out")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = _exit_code(study_main, argv)
    errors = [line for line in err.getvalue().splitlines() if "error" in line]
    assert code in (0, 2) and "Traceback" not in err.getvalue(), err.getvalue()[-1500:]
    assert code == 0 or len(errors) == 1, err.getvalue()[-1500:]


STATES = st.fixed_dictionaries({
    "checkpoints": st.lists(st.integers(1, 9), unique=True, max_size=3),
    "partial": st.booleans(),  # a save cut short: a hidden .step_*.tmp
    "records": st.integers(0, 5),
    "cut_record": st.booleans(),  # the last metrics line cut short by a kill
    "foreign": st.booleans(),
    "locked": st.booleans(),
    "resume": st.sampled_from([None, "latest", "own", "other", "bogus"]),
    "overwrite": st.booleans(),
})  # fmt: skip


def _make_state(run: Path, state: dict) -> None:
    from vlp import checkpoint

    run.mkdir(parents=True)
    for step in state["checkpoints"]:
        path = run / "checkpoints" / checkpoint.checkpoint_name(step)
        path.mkdir(parents=True)
        (path / checkpoint.META_FILE).write_text(json.dumps({"step": step}))
    if state["partial"]:
        (run / "checkpoints" / ".step_000000010.tmp").mkdir(parents=True)
    lines = [json.dumps({"step": s}) + "\n" for s in range(1, state["records"] + 1)]
    if state["cut_record"]:
        lines.append('{"step": 9, "lo')
    if lines:
        (run / "metrics.jsonl").write_text("".join(lines))
    if state["foreign"]:
        (run / "notes.txt").write_text("the user's")


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
            if p.is_file() and not p.name.endswith(".lock")}  # fmt: skip


@FUZZ
@given(STATES)
def test_any_run_directory_state_starts_or_refuses_in_one_line_and_loses_nothing(
    tmp_path_factory, state
):
    """Empty, partial checkpoint, cut-short metrics, foreign files, locked: a start either goes
    ahead without landing on a run, or is one line; no file is ever deleted or changed (moved
    aside whole with --overwrite; the records up to a resumed step are carried over)."""
    from vlp import checkpoint, rundir, runlock

    root = tmp_path_factory.mktemp("states")
    run, other = root / "run", root / "other"
    _make_state(run, state)
    _make_state(other, {**state, "checkpoints": [5], "locked": False})
    steps = sorted(state["checkpoints"])
    resume = {"own": str(run / "checkpoints" / checkpoint.checkpoint_name(steps[0])) if steps
              else "latest", "other": str(other / "checkpoints" / checkpoint.checkpoint_name(5)),
              "bogus": str(root / "nowhere")}.get(state["resume"], state["resume"])  # fmt: skip
    before, holds_run = _files(run), bool(steps or state["records"] or state["cut_record"])
    holder = runlock.acquire(run, "holder") if state["locked"] else None
    try:
        lock, start = rundir.claim(run, resume, state["overwrite"], "vlp-train")
        lock.release()
    except (ConfigError, runlock.Busy) as err:
        assert "\n" not in str(err) and str(err), err
        assert _files(run) == before
        return
    finally:
        if holder is not None:
            holder.release()
    assert not state["locked"]
    if start.moved_to is not None:
        assert state["overwrite"] and holds_run and _files(Path(start.moved_to)) == before
    elif start.checkpoint is None:  # a fresh start never lands on a run's checkpoints
        assert not steps and (resume == "latest" or not holds_run)
        assert _files(run) == before
    else:
        assert _files(run) == before and Path(start.checkpoint).is_dir()
