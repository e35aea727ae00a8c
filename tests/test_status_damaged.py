"""``ccsr status`` on a run directory it cannot read: damaged records, or records and a config of another
ccsr version. Exactly one ``ccsr: error:`` line naming the file, exit code 2, never a traceback; the one
thing tolerated is the torn last line a crash mid-append leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccsr import gate
from ccsr.cli import EXIT_BAD_INPUT, main
from ccsr.config_files import load_config, save_config
from ccsr.records import Candidate, Judgment, PromptRecord, append_records
from ccsr.rundir import RunDir, atomic_write_json

REPO = Path(__file__).resolve().parent.parent


def one_error_line(err: str) -> str:
    """The whole stderr of a refused command: exactly one ``ccsr: error: ...`` line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ccsr: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def run(tmp_path) -> RunDir:
    """A run directory as the loop leaves it after the first stages of iteration 1 and its evaluation, written
    through the loop's own writers; ``ccsr status`` reads it as it is."""
    run = RunDir(tmp_path / "runs" / "giraffe")
    save_config(load_config("configs/tiny.yaml", class_name="giraffe"), run.config_path)
    prompts = [
        PromptRecord(id=f"p{i}", prompt=f"a giraffe, take {i}", class_name="giraffe") for i in range(3)
    ]
    append_records(run.validation_path, prompts[:1])
    files = run.files(1)
    append_records(files["prompts"], prompts)
    append_records(
        files["candidates"],
        [Candidate(p.id, 0, 7, f"iterations/001/candidates/{p.id}-00.png") for p in prompts],
    )
    append_records(files["judgments"], [Judgment(p.id, 0, ["yes"] * 10, 10) for p in prompts])
    for stage in ("prompts", "candidates", "judge"):
        run.mark_done(1, stage, seconds=1.5)
    atomic_write_json(run.eval_path(1), {"win_rate": 0.5, "best_scale": 1.0})
    gate.record(
        run, {"iteration": 1, "accepted": True, "metric_name": "win_rate", "metric": 0.5, "scale": 1.0}
    )
    run.heartbeat(iteration=1, stage="filter", unit=None)
    return run


def status(root: Path, capsys, *flags: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["status", str(root), *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_intact_run_reads(run, capsys):
    code, out, err = status(run.root, capsys, "--json")
    assert code == 0 and err == ""
    st = json.loads(out)
    assert st["iterations"][0]["candidates"] == 3 and st["iterations"][0]["judged"] == 3
    assert st["stage"] == "filter" and st["champion"]["iteration"] == 1 and st["validation_prompts"] == 1


def test_a_torn_last_line_is_a_crash_not_damage(run, capsys):
    """A crash mid-append leaves half a line at the end; the loop cuts it off on its next start."""
    path = run.files(1)["candidates"]
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"prompt_id": "p3", "ind')
    code, out, err = status(run.root, capsys, "--json")
    assert code == 0 and "Traceback" not in err
    assert json.loads(out)["iterations"][0]["candidates"] == 3


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


def insert_line(path: Path, line: bytes) -> None:
    """A complete line before the last record (not a torn tail)."""
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:-1], line + b"\n", lines[-1]]))


ITER = Path("iterations") / "001"
# (what is done to the run directory, the file the error names, what it says)
DAMAGE = {
    "config of a newer version": (
        lambda run: run.config_path.write_text(run.config_path.read_text() + "future_knob: 3\n"),
        "config.yaml",
        "cannot read run",
    ),
    "config not YAML": (
        lambda run: run.config_path.write_text("generator: [\n"),
        "config.yaml",
        "not valid YAML",
    ),
    "stages.json truncated": (
        lambda run: truncate(run.iteration_dir(1) / "stages.json"),
        "stages.json",
        "not valid JSON",
    ),
    "stages.json a list": (
        lambda run: write_json(run.iteration_dir(1) / "stages.json", ["prompts", "candidates"]),
        "stages.json",
        "not the stage record this ccsr version writes (not a mapping",
    ),
    "stage time not a number": (
        lambda run: write_json(run.iteration_dir(1) / "stages.json", {"prompts": {"seconds": "fast"}}),
        "stages.json",
        "'seconds' is str, not int or float",
    ),
    "eval.json truncated": (lambda run: truncate(run.eval_path(1)), "eval.json", "not valid JSON"),
    "eval.json win rate of another type": (
        lambda run: write_json(run.eval_path(1), {"win_rate": "50%", "best_scale": 1.0}),
        "eval.json",
        "'win_rate' is str",
    ),
    "champion without a scale": (
        lambda run: write_json(run.champion_path, {"champion": {"iteration": 1}, "history": []}),
        "champion.json",
        "no 'scale'",
    ),
    "champion.json not UTF-8": (
        lambda run: run.champion_path.write_bytes(b"\xff\xfe{}"),
        "champion.json",
        "not valid JSON",
    ),
    "heartbeat without a time": (
        lambda run: write_json(run.heartbeat_path, {"pid": 1, "when": "now"}),
        "heartbeat.json",
        "no 'time'",
    ),
    "heartbeat a folder": (
        lambda run: run.heartbeat_path.unlink() or run.heartbeat_path.mkdir(),
        "heartbeat.json",
        "cannot be read (Is a directory); fix its permissions, or move it",
    ),
    "a corrupt line": (
        lambda run: insert_line(run.files(1)["candidates"], b'{"prompt_id": "p9", "index": 0, "se'),
        "candidates.jsonl",
        "line 3 is not a JSON object",
    ),
    "a line not UTF-8": (
        lambda run: insert_line(run.files(1)["prompts"], b"\xff\xff\xff"),
        "prompts.jsonl",
        "line 3",
    ),
    "a corrupt line in a rank's shard": (
        lambda run: (run.iteration_dir(1) / "judgments.rank-1.jsonl").write_bytes(
            b'{"prompt_id": "p9", \n{}\n'
        ),
        "judgments.rank-1.jsonl",
        "line 1 is not a JSON object",
    ),
    "a record of another shape": (
        lambda run: insert_line(run.files(1)["judgments"], b'{"prompt_id": "p9", "verdict": "yes"}'),
        "judgments.jsonl",
        "record 3 is not a Judgment",
    ),
    "a validation prompt of another shape": (
        lambda run: insert_line(run.validation_path, b'{"text": "a giraffe"}'),
        "validation_prompts.jsonl",
        "record 1 is not a PromptRecord",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_status_refuses_what_it_cannot_read_in_one_line(run, capsys, case):
    damage, file_name, expected = DAMAGE[case]
    damage(run)
    # One run, as a table and as JSON; a folder of runs (the summary table).
    for root, flags in ((run.root, ()), (run.root, ("--json",)), (run.root.parent, ())):
        code, out, err = status(root, capsys, *flags)
        assert code == EXIT_BAD_INPUT and out == ""
        line = one_error_line(err)
        assert file_name in line and expected in line, line


def test_an_embedded_model_this_version_does_not_know_is_shown_by_name(run):
    """A run of another version may name an embedded model this one lacks: status shows the name as written,
    and says so in one warning line, without a traceback (a subprocess: pytest would capture the log)."""
    text = run.config_path.read_text().replace("ccsr-tiny/stable-diffusion", "ccsr-tiny/stable-diffusion-xl")
    run.config_path.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ccsr", "status", str(run.root), "--json"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "stable-diffusion-xl" in done.stderr
    assert json.loads(done.stdout)["base_model"] == "ccsr-tiny/stable-diffusion-xl"


def test_a_run_with_a_line_the_loop_skipped_still_ends_cleanly(run, capsys):
    """``ccsr run`` ends by printing the status; a damaged line the loop skipped makes that a warning, not an
    error: the run itself is complete."""
    cfg = load_config(run.config_path)
    n = cfg.generator.num_candidates
    files = run.files(1)
    prompts = [
        PromptRecord(id=f"p{i}", prompt=f"a giraffe, take {i}", class_name="giraffe") for i in range(3)
    ]
    candidates = [
        Candidate(p.id, i, 7 + i, f"iterations/001/candidates/{p.id}-{i:02d}.png")
        for p in prompts
        for i in range(n)
    ]
    for path in (files["candidates"], files["judgments"]):
        path.unlink()
    append_records(files["candidates"], candidates)
    append_records(files["judgments"], [Judgment(c.prompt_id, c.index, ["yes"] * 10, 10) for c in candidates])
    insert_line(files["judgments"], b"{damaged")
    for stage in ("filter", "train", "eval"):
        run.mark_done(1, stage, seconds=1.0)
    capsys.readouterr()
    argv = [
        "run",
        "--config",
        "configs/tiny.yaml",
        "--class",
        "giraffe",
        "--run-dir",
        str(run.root),
        "--iterations",
        "1",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "judgments.jsonl" in err and "Traceback" not in err
