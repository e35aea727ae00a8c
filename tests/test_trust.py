"""The trust rule (docs/trust.md): nothing a run directory says makes ccsr import code or unpickle a file that
the user did not name. Each test builds the run directory an attacker (or a careless edit) would leave."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ccsr.cli import main
from ccsr.config_files import load_config, save_config
from ccsr.rundir import RunDir
from tests.test_cli_errors import refused

TINY = "configs/tiny.yaml"


@pytest.fixture(autouse=True)
def _clean_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the code under test may add the current folder


def saved_run(root: Path, *sets: str) -> Path:
    """A run directory as far as the commands look before loading a model: its config and a LoRA file."""
    save_config(load_config(TINY, list(sets), class_name="giraffe"), root / "config.yaml")
    lora = RunDir(root).lora_file(1)
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"not looked at")
    return root


@pytest.fixture
def planted(tmp_path, monkeypatch, request):
    """A run directory whose config names a module inside it as the judge, evaluated from the folder above:
    importing the module leaves a marker file."""
    name = "run_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    monkeypatch.chdir(tmp_path)
    root = saved_run(tmp_path / name, f"judge.backend={name}.payload:Judge")
    marker = tmp_path / "imported"
    (root / "payload.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Judge: ...\n")
    return root, marker


def test_eval_does_not_import_a_backend_named_only_by_the_run(planted, capsys):
    root, marker = planted
    line = refused(["eval", root.name], capsys)
    assert "judge.backend" in line and "--trust-run-config" in line
    assert not marker.exists()


def test_generate_run_does_not_import_a_backend_named_only_by_the_run(planted, capsys):
    root, marker = planted
    line = refused(["generate", "--run", root.name, "--prompt", "a giraffe", "--out", "x.png"], capsys)
    assert "judge.backend" in line and "--trust-run-config" in line
    assert not marker.exists()


def test_trust_run_config_accepts_the_runs_backend(planted, capsys):
    root, marker = planted
    main(["generate", "--run", root.name, "--prompt", "a giraffe", "--out", "x.png", "--trust-run-config"])
    assert marker.exists()


def test_status_and_report_import_nothing_of_the_run(planted, capsys):
    root, marker = planted
    main(["status", root.name])
    main(["report", root.name])
    assert not marker.exists()


def test_eval_does_not_unpickle_a_detector_file_named_only_by_the_run(tmp_path, capsys):
    pt = tmp_path / "weights.pt"
    pt.write_bytes(b"a pickle would run code here")
    root = saved_run(tmp_path / "run", f"detector.model={pt}")
    line = refused(["eval", str(root)], capsys)
    assert "detector.model" in line and "--trust-run-config" in line


@pytest.mark.parametrize(
    "key, value", [("detector.model", "PT"), ("seed", "99"), ("judge.model", "other/llava")]
)
def test_resume_refuses_a_run_config_that_differs_on_a_guarded_key(tmp_path, monkeypatch, capsys, key, value):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    pt = tmp_path / "weights.pt"
    pt.write_bytes(b"a pickle would run code here")
    root = tmp_path / "run"
    root.mkdir()
    saved = load_config(TINY, [f"{key}={pt if value == 'PT' else value}"], class_name="giraffe")
    save_config(saved, root / "config.yaml")
    line = refused(["run", "--config", TINY, "--class", "giraffe", "--run-dir", str(root)], capsys)
    assert f": {key} is " in line and "--trust-run-config" in line
    assert not (root / "iterations").exists()


def test_eval_with_the_users_config_repeating_the_run_passes_the_rule(tmp_path, capsys):
    root = saved_run(tmp_path / "run")
    line = refused(["eval", str(root), "--config", TINY], capsys)
    assert "trust-run-config" not in line  # it gets as far as the LoRA, which is not a LoRA
    line = refused(["eval", str(root), "--config", TINY, "--set", "seed=5"], capsys)
    assert ": seed is 1234 but your config says 5" in line


def test_generate_run_refuses_a_champion_outside_the_run(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    root = saved_run(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    champion = {"champion": {"iteration": 1, "lora": "../elsewhere", "scale": 1.0}}
    (root / "champion.json").write_text(json.dumps(champion))
    line = refused(
        ["generate", "--run", str(root), "--prompt", "a giraffe", "--out", str(tmp_path / "x.png")], capsys
    )
    assert "champion.json" in line and "outside the run directory" in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("scales", [["0"], ["0", "0"]])
def test_eval_at_scale_zero_only_is_refused(tmp_path, monkeypatch, capsys, scales):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    root = saved_run(tmp_path / "run")
    line = refused(["eval", str(root), "--scales", *scales], capsys)
    assert "only the base model" in line and "iteration 1" in line


def test_a_huge_validation_file_is_refused_at_the_door(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    prompts = tmp_path / "validation.txt"
    prompts.write_text("".join(f"a giraffe number {i}\n" for i in range(100_000)))
    line = refused(["validate", "--config", TINY, "--set", f"prompter.validation_file={prompts}"], capsys)
    assert "holds 100000 prompts" in line and "prompter.max_validation (1000)" in line
    raised = ["--set", f"prompter.validation_file={prompts}", "--set", "prompter.max_validation=100000"]
    assert main(["validate", "--config", TINY, *raised]) == 0


def test_a_binary_system_prompt_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    binary = tmp_path / "system.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    line = refused(["validate", "--config", TINY, "--set", f"prompter.system_prompt={binary}"], capsys)
    assert "prompter.system_prompt" in line and "UTF-8" in line
    binary.write_bytes(b"you write prompts\x00\x01\x02")
    line = refused(["validate", "--config", TINY, "--set", f"prompter.system_prompt={binary}"], capsys)
    assert "prompter.system_prompt" in line and "binary" in line


def test_report_of_a_class_name_with_dollars_and_carets(tmp_path, monkeypatch, capsys):
    import yaml

    from tests.test_report import make_run

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    root = make_run(tmp_path / "run", extended=True)
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["class_name"] = "$gir^$ and $^$"
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["report", str(root)]) == 0, capsys.readouterr().err
    assert (root / "report" / "across-iterations.png").stat().st_size > 0


def test_a_trusted_run_config_naming_a_missing_model_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    root = tmp_path / "run"
    root.mkdir()
    missing = tmp_path / "no" / "such" / "model"
    save_config(load_config(TINY, [f"judge.model={missing}"], class_name="giraffe"), root / "config.yaml")
    args = ["run", "--config", TINY, "--class", "giraffe", "--run-dir", str(root), "--trust-run-config"]
    line = refused(args, capsys)
    assert line.startswith("ccsr: error: judge.model") and "does not exist" in line
    assert not (root / "iterations").exists()


def test_python_m_ccsr_does_not_import_from_the_current_folder(tmp_path):
    """``python -m`` puts the current folder first on sys.path: run from inside a run directory, a planted
    ``yaml.py`` would stand in for the library ccsr imports first."""
    import os
    import subprocess

    marker = tmp_path / "imported"
    (tmp_path / "yaml.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "ccsr", "status", "."], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "not a ccsr run directory" in done.stderr, done.stderr
    assert not marker.exists()
