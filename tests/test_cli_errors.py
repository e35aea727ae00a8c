"""Bad input to the command line: one line on stderr naming the problem and the fix, exit code 2, no
traceback (unless --debug), nothing written. A full disk: one line, non-zero exit, no temp or torn files, and
the next start continues."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ccsr.rundir
from ccsr.cli import EXIT_BAD_INPUT, main
from ccsr.rundir import RunDir, atomic_write_text, read_jsonl, slugify

TINY = "configs/tiny.yaml"


@pytest.fixture(autouse=True)
def _in_repo(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


def one_error_line(capsys) -> str:
    """The whole stderr of a refused command: exactly one ``ccsr: error: ...`` line, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ccsr: error: ") and "Traceback" not in err, err
    return lines[0]


def refused(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == EXIT_BAD_INPUT
    return one_error_line(capsys)


def run_args(run_dir: Path, *sets: str, class_name: str = "giraffe") -> list[str]:
    args = ["run", "--config", TINY, "--class", class_name, "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    return args


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def fake_folders(tmp_path) -> dict[str, Path]:
    """Folders that look like models by their files only: the checks must not need weights."""
    write(tmp_path / "yolo" / "b.pt", "x")
    return {
        "empty": (tmp_path / "empty").mkdir() or tmp_path / "empty",
        "clip": write(tmp_path / "clip" / "config.json", json.dumps({"model_type": "clip"})).parent,
        "llava": write(tmp_path / "llava" / "config.json", json.dumps({"model_type": "llava_next"})).parent,
        "sd": write(tmp_path / "sd" / "model_index.json", "{}").parent,
        "file": write(tmp_path / "weights.bin", "x"),
        "bad_json": write(tmp_path / "broken" / "config.json", "{not json").parent,
        "two_pt": write(tmp_path / "yolo" / "a.pt", "x").parent,
        "one_pt": write(tmp_path / "yolo1" / "yolo-world.pt", "x").parent,
    }


# --- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, expected",
    [
        ("bogus=1", "unknown key 'bogus'"),
        ("generator.bogus=1", "unknown key 'generator.bogus'"),
        ("generator.steps=many", "'generator.steps' must be int"),
        ("detector.threshold=high", "'detector.threshold' must be float"),
        ("offline=maybe", "'offline' must be bool"),
        ("generator.num_candidates=0", "'generator.num_candidates' must be > 0"),
        ("prompter.n_prompts=-3", "'prompter.n_prompts' must be > 0"),
        ("trainer.max_steps=0", "'trainer.max_steps' must be > 0"),
        ("trainer.lr_warmup_steps=-1", "'trainer.lr_warmup_steps' must be >= 0"),
        ("detector.threshold=1.5", "'detector.threshold' must be within [0, 1]"),
        ("detector.threshold=-0.1", "'detector.threshold' must be within [0, 1]"),
        ("evaluator.scales=[0.0, 1.5]", "'evaluator.scales' must be within [0, 1]"),
        ("evaluator.scales=[]", "'evaluator.scales' must list at least one"),
        ("generator.generation_scale=2", "'generator.generation_scale' must be within [0, 1]"),
        ("device=gpu", "'device' must be auto, cpu, mps, cuda or cuda:N"),
        ("judge.model=", "'judge.model' is empty"),
        ("detector.text_model= ", "'detector.text_model' is empty"),
        ("judge.backend=nope", "unknown judge backend 'nope': use one of transformers, vllm"),
        ("generator.resolution=500", "'generator.resolution' must be a multiple of 8"),
        ("evaluator.scales=[0]", "'evaluator.scales' must list at least one LoRA scale > 0"),
        ("trainer.prior_weight=-1", "'trainer.prior_weight' must be >= 0"),
        ("trainer.checkpoint_every=-1", "'trainer.checkpoint_every' must be >= 0"),
    ],
)
def test_config_values_are_refused_before_anything_is_written(tmp_path, capsys, override, expected):
    line = refused(run_args(tmp_path / "run", override), capsys)
    assert expected in line and "tiny.yaml" in line
    assert not (tmp_path / "run").exists()
    # ``validate`` says the same thing.
    assert refused(["validate", "--config", TINY, "--set", override], capsys) == line


@pytest.mark.parametrize(
    "key, folder, expected",
    [
        ("judge.model", None, "does not exist"),
        ("generator.model", "empty", "holds no model_index.json"),
        ("generator.model", "file", "is a file"),
        ("judge.model", "sd", "holds no config.json"),
        ("judge.model", "clip", "holds a clip model, not a LLaVA-Next folder"),
        ("judge.model", "bad_json", "not a readable JSON config"),
        ("evaluator.model", "llava", "holds a llava_next model, not a CLIP folder"),
        ("detector.text_model", "sd", "holds no config.json"),
        ("prompter.model", "empty", "holds no config.json"),
        ("detector.model", "empty", "holds no .pt files"),
        ("detector.model", "two_pt", "holds 2 .pt files"),
        ("detector.model", "file", "is not a .pt file"),
    ],
)
def test_model_folders_of_the_wrong_kind(tmp_path, capsys, fake_folders, key, folder, expected):
    path = fake_folders[folder] if folder else tmp_path / "no" / "such" / "model"
    line = refused(run_args(tmp_path / "run", f"{key}={path}"), capsys)
    assert line.startswith(f"ccsr: error: {key}: ") and expected in line
    assert not (tmp_path / "run").exists()


def test_model_names_that_are_accepted_without_loading(fake_folders, capsys):
    sets = [
        f"judge.model={fake_folders['llava']}",
        f"evaluator.model={fake_folders['clip']}",
        f"generator.model={fake_folders['sd']}",
        f"detector.model={fake_folders['one_pt']}",
        "detector.text_model=openai/clip-vit-base-patch32",  # a hub id: not looked up
        "prompter.model=gpt2",
    ]
    argv = ["validate", "--config", TINY]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")


def test_embedded_model_names_and_downloads_offline(capsys):
    line = refused(["validate", "--config", TINY, "--set", "judge.model=ccsr-tiny/llava-nxt"], capsys)
    assert "unknown embedded model 'ccsr-tiny/llava-nxt'" in line and "ccsr-tiny/llava-next" in line
    # ultralytics would download a bare asset name; offline: true (tiny.yaml) cannot.
    line = refused(["validate", "--config", TINY, "--set", "detector.model=yolov8s-worldv2.pt"], capsys)
    assert "offline: true" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_model_folder(tmp_path, capsys, fake_folders):
    folder = fake_folders["llava"]
    folder.chmod(0)
    try:
        line = refused(["validate", "--config", TINY, "--set", f"judge.model={folder}"], capsys)
    finally:
        folder.chmod(0o755)
    assert "cannot be read" in line


@pytest.mark.parametrize(
    "questions, expected",
    [
        ("questions: []\n", "'questions' must be a non-empty list"),
        ("questions:\n  - {id: Q1, text: 'Is it a {class_name}?', polarity: sideways}\n", "polarity"),
        ("questions: [\n", "not valid YAML"),
    ],
)
def test_question_file_that_does_not_validate(tmp_path, capsys, questions, expected):
    path = write(tmp_path / "q.yaml", questions)
    line = refused(run_args(tmp_path / "run", f"judge.questions={path}"), capsys)
    assert line.startswith("ccsr: error: judge.questions: ") and str(path) in line and expected in line
    assert not (tmp_path / "run").exists()


def test_missing_data_files(tmp_path, capsys):
    line = refused(["validate", "--config", TINY, "--set", f"judge.questions={tmp_path}/none.yaml"], capsys)
    assert "not found" in line
    line = refused(["validate", "--config", TINY, "--set", "prompter.examples=prompts/none.txt"], capsys)
    assert "prompter.examples" in line and "not found" in line
    line = refused(["validate", "--config", str(tmp_path / "none.yaml")], capsys)
    assert "config file not found" in line


@pytest.mark.parametrize("metric", ["judge_score", "detection_rate"])
def test_a_gate_metric_the_evaluation_does_not_compute_is_refused(capsys, metric):
    # Without judge and detector on the evaluation images, the summary has no such metric: the gate would
    # score every LoRA 0.0.
    base = ["validate", "--config", TINY, "--set", f"gate.metric={metric}"]
    assert main(base) == 0
    line = refused([*base, "--set", "evaluator.judge_and_detect=false"], capsys)
    assert f"'gate.metric' {metric}" in line and "evaluator.judge_and_detect: true" in line
    for computed in ("win_rate", "clip_score"):
        argv = ["validate", "--config", TINY, "--set", f"gate.metric={computed}"]
        assert main([*argv, "--set", "evaluator.judge_and_detect=false"]) == 0


def test_a_p_yes_tie_break_needs_the_logits_mode(capsys):
    base = ["validate", "--config", TINY, "--set", "judge.tie_break=p_yes"]
    assert main(base) == 0
    line = refused([*base, "--set", "judge.mode=generate"], capsys)
    assert "'judge.tie_break' p_yes needs judge.mode: logits" in line


def test_an_empty_validation_file_is_refused(tmp_path, capsys):
    path = write(tmp_path / "validation.txt", "\n  \n")
    line = refused(["validate", "--config", TINY, "--set", f"prompter.validation_file={path}"], capsys)
    assert line.startswith("ccsr: error: prompter.validation_file: ") and "holds no prompt" in line
    write(path, "a giraffe at dusk\n")
    assert main(["validate", "--config", TINY, "--set", f"prompter.validation_file={path}"]) == 0


# --- class names -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("..", "is not a name"),
        ("a/b", "path separator"),
        ("../etc", "path separator"),
        ("a\\b", "path separator"),
        ("gir\x00affe", "control"),
        ("gir\naffe", "control"),
        ("\x1b[31mred", "control"),
        ("gir\udcffaffe", "undecodable"),  # what Python makes of non-UTF-8 bytes in argv
        ("x" * 500, "500 characters"),
    ],
)
def test_bad_class_names(tmp_path, monkeypatch, capsys, name, expected):
    monkeypatch.chdir(tmp_path)  # the default run dir would be runs/<slug> here
    repo = Path(__file__).resolve().parent.parent
    line = refused(["run", "--config", str(repo / TINY), "--class", name], capsys)
    assert "class name" in line and expected in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, slug", [("Schwan", "schwan"), ("zebra crossing", "zebra-crossing"), ("松鼠", "松鼠")]
)
def test_non_ascii_class_names_get_a_safe_slug_and_keep_their_name(tmp_path, monkeypatch, capsys, name, slug):
    monkeypatch.chdir(tmp_path)
    repo = Path(__file__).resolve().parent.parent
    run_root = tmp_path / "runs" / slug
    write(run_root / "STOP", "")  # stop at the first unit boundary: this test is about names, not models
    assert main(["run", "--config", str(repo / TINY), "--class", f"  {name} "]) == 0
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [slug]
    assert yaml.safe_load((run_root / "config.yaml").read_text(encoding="utf-8"))["class_name"] == name
    assert main(["status", str(run_root), "--json"]) == 0


def test_slug_of_a_name_without_letters_is_the_same_in_every_process():
    code = "from ccsr.rundir import slugify; print(slugify('!!! ???'))"
    slugs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert slugs == {slugify("!!! ???")} and slugify("!!! ???").startswith("class-")


# --- run directory -----------------------------------------------------------------------------------
def test_run_dir_below_a_regular_file(tmp_path, capsys):
    blocker = write(tmp_path / "not-a-dir", "x")
    line = refused(run_args(blocker / "run"), capsys)
    assert "not writable" in line and "--run-dir" in line
    assert blocker.read_text() == "x"


def test_run_dir_that_is_a_regular_file(tmp_path, capsys):
    blocker = write(tmp_path / "run", "x")
    assert "not writable" in refused(run_args(blocker), capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_run_dir_below_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        assert "not writable" in refused(run_args(ro / "a" / "run"), capsys)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_check_writable_removes_the_folders_it_made(tmp_path):
    blocker = write(tmp_path / "file", "x")
    with pytest.raises(ccsr.rundir.RunDirError):
        RunDir(blocker / "a" / "b").check_writable()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --- other commands ----------------------------------------------------------------------------------
def test_status_of_a_missing_run_dir(tmp_path, capsys):
    line = refused(["status", str(tmp_path / "nope")], capsys)
    assert "not a ccsr run directory" in line
    assert not (tmp_path / "nope").exists()


def test_generate_refuses_before_loading_a_model(tmp_path, capsys):
    base = ["generate", "--config", TINY, "--prompt", "a giraffe"]
    lora = tmp_path / "lora"
    lora.mkdir()
    write(lora / "adapter_model.bin", "x")
    line = refused([*base, "--lora", str(lora), "--out", str(tmp_path / "a.png")], capsys)
    assert "no pytorch_lora_weights.safetensors" in line
    line = refused([*base, "--lora", str(tmp_path / "missing"), "--out", str(tmp_path / "a.png")], capsys)
    assert "folder not found" in line
    assert "--num must be > 0" in refused([*base, "--num", "0", "--out", str(tmp_path / "a.png")], capsys)
    blocker = write(tmp_path / "blocker", "x")
    assert "cannot create its folder" in refused([*base, "--out", str(blocker / "a.png")], capsys)
    assert "is a folder" in refused([*base, "--out", str(tmp_path)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "lora"]


@pytest.mark.parametrize("n", ["0", "-2"])
def test_iterations_must_be_positive(tmp_path, capsys, n):
    line = refused([*run_args(tmp_path / "run"), "--iterations", n], capsys)
    assert "--iterations must be > 0" in line
    assert not (tmp_path / "run").exists()


def test_usage_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate"])
    assert exc.value.code == EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "--config" in line and "--help" in line
    with pytest.raises(SystemExit):
        main(["run", "--config", TINY, "--class", "a", "--iterations", "two"])
    assert "invalid int value" in one_error_line(capsys)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    argv = ["status", str(tmp_path / "nope")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(Exception, match="not a ccsr run directory"):
        main(argv)


# --- a full disk -------------------------------------------------------------------------------------
class _FullDisk:
    """A file whose writes stop half way with ENOSPC, as a full disk does."""

    def __init__(self, f, path: str):
        self._f, self._path = f, path

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk_for(monkeypatch, match: str) -> None:
    """Writes by ccsr.rundir to files whose name contains ``match`` fail with ENOSPC."""

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        if any(m in mode for m in "wax") and match in Path(file).name:
            return _FullDisk(f, str(file))
        return f

    monkeypatch.setattr(ccsr.rundir, "open", open_on_full_disk, raising=False)


def test_atomic_writes_on_a_full_disk_leave_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "stages.json"
    atomic_write_text(path, '{"prompts": 1}\n')
    fill_disk_for(monkeypatch, "stages.json")
    with pytest.raises(OSError) as exc:
        atomic_write_text(path, '{"prompts": 1, "candidates": 2}\n')
    assert exc.value.errno == errno.ENOSPC
    assert path.read_text() == '{"prompts": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["stages.json"]


def test_appends_on_a_full_disk_commit_no_half_record(tmp_path, monkeypatch):
    path = tmp_path / "judgments.jsonl"
    ccsr.rundir.append_jsonl(path, [{"prompt_id": "a", "index": 0}])
    with monkeypatch.context() as m:
        fill_disk_for(m, "judgments.jsonl")
        with pytest.raises(OSError):
            ccsr.rundir.append_jsonl(path, [{"prompt_id": "b", "index": i} for i in range(3)])
    assert read_jsonl(path) == [{"prompt_id": "a", "index": 0}]  # the torn tail is not a record
    ccsr.rundir.append_jsonl(path, [{"prompt_id": "c", "index": 0}])
    assert [r["prompt_id"] for r in read_jsonl(path)] == ["a", "c"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_disk_full_during_a_run_stops_cleanly_and_the_next_start_continues(tmp_path, monkeypatch, capsys):
    """The prompts stage hits a full disk when it commits; the rerun finishes that stage (stopped right
    after it by a STOP file, so no other model is needed)."""
    run_dir = tmp_path / "run"
    sets = ["prompter.n_prompts=2", "prompter.n_validation=1", "prompter.max_new_tokens=32"]
    argv = run_args(run_dir, *sets)
    capsys.readouterr()
    with monkeypatch.context() as m:
        fill_disk_for(m, "prompts.jsonl")  # validation_prompts.jsonl and iterations/001/prompts.jsonl
        code = main(argv)
    err = capsys.readouterr().err
    assert code != 0 and code != EXIT_BAD_INPUT
    last = err.strip().splitlines()[-1]
    assert last.startswith("ccsr: error: disk full") and "run the same command again" in last, err
    assert "Traceback" not in err
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    assert not (run_dir / "validation_prompts.jsonl").exists()
    assert "prompts" not in RunDir(run_dir).stages_done(1)

    stop_after_prompts = RunDir.mark_done

    def mark_done(self, k, stage, **info):
        stop_after_prompts(self, k, stage, **info)
        if stage == "prompts":
            (self.root / "STOP").write_text("")

    monkeypatch.setattr(RunDir, "mark_done", mark_done)
    assert main(argv) == 0
    run = RunDir(run_dir)
    assert run.is_done(1, "prompts")
    assert len(read_jsonl(run.files(1)["prompts"])) == 2
    assert len(read_jsonl(run.validation_path)) == 1
    assert [p for p in run_dir.rglob("*") if ".tmp" in p.name] == []


def test_log_file_on_a_full_disk_prints_no_traceback(tmp_path, capsys):
    from ccsr.cli import _setup_logging

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def tell(self):
            return 0

        def flush(self):
            pass

    root = logging.getLogger()
    before = list(root.handlers)
    _setup_logging(logging.INFO, tmp_path / "ccsr.log")
    try:
        handler = next(h for h in root.handlers if isinstance(h, logging.FileHandler))
        handler.stream = FullDisk()
        logging.getLogger("ccsr").info("a record that cannot be written to the log file")
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
    err = capsys.readouterr().err
    assert "a record that cannot" in err  # still shown on stderr
    assert "Logging error" not in err and "Traceback" not in err


# The shapes world's backends (configs/shapes.yaml) declare ``model_keys = ()``.
SHAPES_BACKENDS = "experiments.shapes.backends"


def test_model_keys_of_model_free_backends_are_not_checked(capsys):
    shapes = SHAPES_BACKENDS
    sets = [f"judge.backend={shapes}:MeasuringJudge", "judge.model=/no/such/llava"]
    sets += [f"detector.backend={shapes}:MeasuringDetector", "detector.model=/no/such.pt"]
    sets += [f"prompter.backend={shapes}:GrammarPrompter", "prompter.model=/no/such/lm"]
    argv = ["validate", "--config", TINY]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    line = refused(["validate", "--config", TINY, "--set", "judge.model=/no/such/llava"], capsys)
    assert "judge.model" in line


def test_a_backend_class_without_model_keys_is_checked_for_its_sections_models(capsys):
    # ccsr.prompter:TransformersPrompter declares its keys; collect_prompts is no class and says nothing.
    import ccsr.prompter

    assert not hasattr(ccsr.prompter.PromptBatch, "model_keys")
    sets = ["prompter.backend=ccsr.prompter:PromptBatch", "prompter.model=/no/such/lm"]
    line = refused(["validate", "--config", TINY, "--set", sets[0], "--set", sets[1]], capsys)
    assert line.startswith("ccsr: error: prompter.model: ") and "does not exist" in line
    sets = ["detector.backend=ccsr.prompter:PromptBatch", "detector.text_model=/no/such/clip"]
    line = refused(["validate", "--config", TINY, "--set", sets[0], "--set", sets[1]], capsys)
    assert line.startswith("ccsr: error: detector.text_model: ")


def test_a_backend_that_cannot_be_imported_is_named(capsys):
    line = refused(["validate", "--config", TINY, "--set", "judge.backend=ccsr.no_such_module:Judge"], capsys)
    assert "judge.backend" in line and "cannot import ccsr.no_such_module:Judge" in line
    line = refused(["validate", "--config", TINY, "--set", "judge.backend=ccsr.judge:NoSuchJudge"], capsys)
    assert "judge.backend" in line and "NoSuchJudge" in line


@pytest.mark.parametrize(
    "name, is_hub_id",
    [
        ("gpt2", True),
        ("openai/clip-vit-base-patch32", True),
        ("llava-hf/llava-v1.6-mistral-7b-hf", True),
        ("./gpt2", False),
        ("../models/gpt2", False),
        ("~/models", False),
        ("/abs/path", False),
        ("a/b/c", False),
        ("foo--bar", False),
        ("has space", False),
    ],
)
def test_model_names_that_are_not_on_disk_are_hub_ids_or_missing_paths(capsys, name, is_hub_id):
    argv = ["validate", "--config", TINY, "--set", f"prompter.model={name}"]
    if is_hub_id:
        assert main(argv) == 0
    else:
        line = refused(argv, capsys)
        assert (
            line
            == f"ccsr: error: prompter.model: {name} does not exist; give a causal language model folder or a hub id"
        )


def test_the_ccsr_script_finds_an_experiments_backend_from_the_repository_root():
    """The console script's sys.path starts at its bin folder; an import-path backend is looked up from the
    current folder first, as ``python -m`` does."""
    script = Path(sys.executable).with_name("ccsr")
    if not script.exists():
        pytest.skip("no ccsr console script beside this interpreter")
    cmd = [str(script), "validate", "--config", "configs/shapes.yaml"]
    cmd += ["--set", "generator.model=ccsr-tiny/stable-diffusion"]
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_python_dash_m_ccsr_is_the_cli(tmp_path):
    """``python -m ccsr`` runs the same command line as the ``ccsr`` script (exit codes included)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ok = subprocess.run([sys.executable, "-m", "ccsr", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "usage:" in ok.stdout and "validate" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "ccsr", "validate", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == EXIT_BAD_INPUT and "missing.yaml" in bad.stderr
