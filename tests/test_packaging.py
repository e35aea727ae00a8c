"""ccsr as an installed package: the wheel built from this tree carries the default data (prompts/ and
configs/, as ccsr/_data/) and the report template, and its ``ccsr`` script works from a folder outside the
source tree."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A config of the user's own that names no data file: the question set and the prompter's files are defaults.
OWN_CONFIG = """\
class_name: giraffe
prompter: {model: ccsr-tiny/mistral}
generator: {model: ccsr-tiny/stable-diffusion}
judge: {model: ccsr-tiny/llava-next}
detector: {model: ccsr-tiny/yolo-world, text_model: ccsr-tiny/clip}
evaluator: {model: ccsr-tiny/clip}
"""

PROBE = """\
import importlib.resources, ccsr
from ccsr.config_files import resolve_data_path
print(ccsr.__file__)
print(resolve_data_path("prompts/questions.yaml"))
print(importlib.resources.files("ccsr").joinpath("templates/report.html.j2").is_file())
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline by pip with the hatchling of this environment (the dev extra installs it)."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    cmd += ["--disable-pip-version-check", "-w", str(out), str(REPO)]
    done = _run(cmd, REPO, dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("ccsr-*.whl")
    return path


def test_the_wheel_holds_the_package_its_data_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        f"ccsr/_data/{p.relative_to(REPO).as_posix()}"
        for d in ("prompts", "configs")
        for p in (REPO / d).iterdir()
    }
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "ccsr/templates/report.html.j2" in names and "ccsr/cli.py" in names
    assert {n.split("/")[0] for n in names} == {"ccsr", wheel.name.split("-py3")[0] + ".dist-info"}


def test_the_installed_wheel_runs_outside_the_source_tree(wheel, tmp_path):
    """Install the wheel into a fresh virtual environment and run its ``ccsr`` script from an empty folder.

    The environment: ``python -m venv --without-pip`` run by this interpreter (a venv's python makes a venv of
    its base interpreter), so its site-packages starts empty. ccsr's dependencies are not installed again: a
    ``.pth`` file there names this interpreter's site-packages folders, which Python appends to sys.path
    after the new environment's own site-packages. A plain folder line of a ``.pth`` file is only added to
    sys.path; the ``.pth`` files inside that folder are not read, so the editable install of the source tree
    (itself a ``.pth`` file or an import hook set up by one) stays invisible. The new environment's python
    then runs pip (importable through that line) to install the wheel into its own site-packages with
    ``--no-deps``; ``--ignore-installed`` because the editable install's metadata is visible there too. The
    console script pip writes starts the new environment's python, as a user's would.
    """
    env_dir = tmp_path / "venv"
    done = _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], tmp_path, dict(os.environ))
    assert done.returncode == 0, done.stderr
    python = env_dir / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, {}
    )
    own_site = Path(purelib.stdout.strip())
    (own_site / "project-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    cmd = [str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", "-q"]
    done = _run([*cmd, "--disable-pip-version-check", str(wheel)], tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert not elsewhere.resolve().is_relative_to(REPO)
    probe = _run([str(python), "-c", PROBE], elsewhere, env)
    assert probe.returncode == 0, probe.stderr[-3000:]
    module, questions, template = probe.stdout.split("\n")[:3]
    packaged = own_site / "ccsr"
    assert Path(module) == packaged / "__init__.py", "the imported ccsr must be the installed one"
    assert Path(questions) == packaged / "_data" / "prompts" / "questions.yaml"
    assert template == "True"

    ccsr = str(env_dir / "bin" / "ccsr")
    # A shipped config by its repository name: not in this folder, so the packaged copy.
    done = _run([ccsr, "validate", "--config", "configs/tiny.yaml"], elsewhere, env)
    assert done.returncode == 0 and done.stdout.strip() == "configs/tiny.yaml: ok", done.stderr[-3000:]
    # The user's own config in this folder, with the default question set and prompter files.
    (elsewhere / "mine.yaml").write_text(OWN_CONFIG)
    done = _run([ccsr, "validate", "--config", "mine.yaml"], elsewhere, env)
    assert done.returncode == 0, done.stderr[-3000:]
    # A data file of the current folder wins over the shipped one of the same name.
    (elsewhere / "prompts").mkdir()
    (elsewhere / "prompts" / "questions.yaml").write_text("questions: []\n")
    done = _run([ccsr, "validate", "--config", "mine.yaml"], elsewhere, env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "ccsr: error: judge.questions: prompts/questions.yaml: 'questions' must be a non-empty list"
    )
