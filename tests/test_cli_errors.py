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


# The files of a diffusers Stable Diffusion folder that the checks look for.
SD_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)


def fake_sd(root: Path, without: str | None = None) -> Path:
    for name in SD_FILES:
        if without is None or not (name == without or name.startswith(without + "/")):
            write(root / name, "{}")
    return root


@pytest.fixture
def fake_folders(tmp_path) -> dict[str, Path]:
    """Folders that look like models by their files only: the checks must not need weights (the "weights"
    here are placeholders)."""
    write(tmp_path / "yolo" / "b.pt", "x")
    write(tmp_path / "clip" / "model.safetensors", "x")
    write(tmp_path / "llava" / "model-00001-of-00002.safetensors", "x")
    write(tmp_path / "clip-no-weights" / "config.json", json.dumps({"model_type": "clip"}))
    return {
        "empty": (tmp_path / "empty").mkdir() or tmp_path / "empty",
        "clip": write(tmp_path / "clip" / "config.json", json.dumps({"model_type": "clip"})).parent,
        "llava": write(tmp_path / "llava" / "config.json", json.dumps({"model_type": "llava_next"})).parent,
        "sd": fake_sd(tmp_path / "sd"),
        "clip_no_weights": tmp_path / "clip-no-weights",
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
        ("filter.detection_threshold=high", "'filter.detection_threshold' must be float"),
        ("offline=maybe", "'offline' must be bool"),
        ("generator.num_candidates=0", "'generator.num_candidates' must be > 0"),
        ("prompter.n_prompts=-3", "'prompter.n_prompts' must be > 0"),
        ("trainer.max_steps=0", "'trainer.max_steps' must be > 0"),
        ("trainer.lr_warmup_steps=-1", "'trainer.lr_warmup_steps' must be >= 0"),
        ("filter.detection_threshold=1.5", "'filter.detection_threshold' must be within [0, 1]"),
        ("filter.detection_threshold=-0.1", "'filter.detection_threshold' must be within [0, 1]"),
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
        ("evaluator.scales=[0.5, .nan]", "'evaluator.scales[1]' must be a finite number, got nan"),
        ("generator.generation_scale=.nan", "'generator.generation_scale' must be a finite number"),
        ("gate.margin=.nan", "'gate.margin' must be a finite number"),  # would reject every LoRA silently
        ("trainer.learning_rate=.inf", "'trainer.learning_rate' must be a finite number, got inf"),
        # Each of these passed validate and crashed later (a torch seed is 64-bit; peft needs a module).
        ("seed=18446744073709551616", "'seed' must be below 2**63"),
        ("trainer.target_modules=[]", "'trainer.target_modules' must list at least one module name"),
        ("prompter.n_validation=5000", "'prompter.n_validation' must be at most prompter.max_validation"),
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
        ("evaluator.model", "clip_no_weights", "holds no weights (*.safetensors or *.bin)"),
        ("detector.text_model", "clip_no_weights", "holds no weights"),
    ],
)
def test_model_folders_of_the_wrong_kind(tmp_path, capsys, fake_folders, key, folder, expected):
    path = fake_folders[folder] if folder else tmp_path / "no" / "such" / "model"
    line = refused(run_args(tmp_path / "run", f"{key}={path}"), capsys)
    assert line.startswith(f"ccsr: error: {key}: ") and expected in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "without, expected",
    [
        ("unet/config.json", "holds no unet/config.json"),
        ("unet/diffusion_pytorch_model.safetensors", "holds no unet weights (*.safetensors or *.bin)"),
        ("vae/diffusion_pytorch_model.safetensors", "holds no vae weights"),
        ("text_encoder/model.safetensors", "holds no text_encoder weights"),
        ("text_encoder/config.json", "holds no text_encoder/config.json"),
        ("scheduler/scheduler_config.json", "has no scheduler folder"),
        ("tokenizer", "has no tokenizer folder"),
    ],
)
def test_an_incomplete_generator_folder_is_refused(tmp_path, capsys, without, expected):
    sd = fake_sd(tmp_path / "sd", without=without)
    line = refused(["validate", "--config", TINY, "--set", f"generator.model={sd}"], capsys)
    assert line.startswith(f"ccsr: error: generator.model: {sd} ") and expected in line
    assert "incomplete" in line
    assert main(["validate", "--config", TINY, "--set", f"generator.model={fake_sd(sd)}"]) == 0


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
        # valid YAML of the wrong shape
        ("", "the top level must be a mapping"),
        ("just a sentence\n", "the top level must be a mapping"),
        (
            "- {id: Q1, text: 'Is it a {class_name}?', polarity: positive}\n",
            "the top level must be a mapping",
        ),
        ("questions: Is it a giraffe?\n", "'questions' must be a non-empty list"),
        ("questions: {Q1: 'Is it a {class_name}?'}\n", "'questions' must be a non-empty list"),
        ("questions:\n  - Is it a {class_name}?\n", "question #1: must be a mapping"),
        ("questions:\n  - {text: 'Is it a {class_name}?', polarity: positive}\n", "missing or empty 'id'"),
        ("questions:\n  - {id: Q1, polarity: positive}\n", "question Q1: missing or empty 'text'"),
        (
            "questions:\n  - {id: Q1, text: 'Is it a {class_name}?'}\n",
            "polarity must be positive or negative",
        ),
        ("instruction: [yes, no]\nquestions: []\n", "'instruction' must be a string"),
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
    base = ["validate", "--config", TINY, "--set", "filter.tie_break=p_yes"]
    assert main(base) == 0
    line = refused([*base, "--set", "judge.mode=generate"], capsys)
    assert "'filter.tie_break' p_yes needs judge.mode: logits" in line


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
    assert line.startswith(f"ccsr: error: {lora}: no pytorch_lora_weights.safetensors in this folder; ")
    line = refused([*base, "--lora", str(tmp_path / "missing"), "--out", str(tmp_path / "a.png")], capsys)
    assert line.startswith(f"ccsr: error: {tmp_path / 'missing'}: no such file or folder; ")
    assert "--num must be > 0" in refused([*base, "--num", "0", "--out", str(tmp_path / "a.png")], capsys)
    blocker = write(tmp_path / "blocker", "x")
    assert "cannot create its folder" in refused([*base, "--out", str(blocker / "a.png")], capsys)
    assert "is a folder" in refused([*base, "--out", str(tmp_path)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "lora"]


# --- LoRA files, prompts, scales and counts of generate / eval / export ----------------------------------
TINY_SD = "ccsr-tiny/stable-diffusion"
# A layer of the tiny SD's UNet (32 features in and out), as the LoRA layouts spell it.
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def good_lora(tmp_path_factory) -> Path:
    """A LoRA folder for the tiny SD written by ccsr's own writer (``ccsr.lora.save``) from a peft
    adapter on the real tiny UNet, its up matrices drawn non-zero so that it changes the images."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from ccsr import lora
    from ccsr.models import resolve_model

    unet = UNet2DConditionModel.from_pretrained(resolve_model(TINY_SD), subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet.add_adapter(config, adapter_name=lora.ADAPTER_NAME)
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5)
    return lora.save(unet, tmp_path_factory.mktemp("good-lora")).parent


def lora_pair(layer: str, down: str, up: str, n_in: int = 32, n_out: int = 32, rank: int = 4) -> dict:
    import torch

    return {layer + down: torch.randn(rank, n_in), layer + up: torch.randn(n_out, rank)}


def diffusers_pair(layer: str, n_in: int = 32, n_out: int = 32) -> dict:
    return lora_pair(layer, ".lora.down.weight", ".lora.up.weight", n_in, n_out)


def kohya_pair(module: str, n_in: int = 32, n_out: int = 32) -> dict:
    return lora_pair(module, ".lora_down.weight", ".lora_up.weight", n_in, n_out)


# case: what is wrong in the file's own words. The first group is wrong whatever the model; the second only
# against the configured model's UNet (export, which has no model, converts those).
BAD_LORAS = {
    "truncated": "not a readable safetensors file (Error while deserializing header: incomplete metadata, "
    "file not fully covered); it is truncated or corrupt, replace it",
    "torn header": "not a readable safetensors file",
    "not safetensors": "not a readable safetensors file",
    "no tensors": "holds no tensors, so it is not a LoRA",
    "model checkpoint": "'conv_in.weight' is not a LoRA weight; give a LoRA file, not a model checkpoint",
    "text encoder only": "holds no UNet weights, only text-encoder ones such as "
    "'text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight'",
    "kohya text encoder only": "holds no UNet weights, only text-encoder ones such as 'lora_te_text_model",
    "sdxl text_encoder_2": "holds text-encoder weights of an SDXL LoRA such as 'text_encoder_2.",
    "down matrix only": f"layer {LAYER} has no up matrix; the file is incomplete",
    "nan values": f"layer {LAYER}: the up matrix holds NaN or infinite values; replace it",
    "ranks differ": f"layer {LAYER}: down matrix [4, 32] and up matrix [32, 8] do not fit together",
}
FOREIGN_LORAS = {
    "sdxl block": "adapts layer down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q, which the UNet of "
    f"{TINY_SD} does not have: a LoRA for another model (such as SDXL); give a LoRA trained on {TINY_SD}",
    "sdxl add_embedding": f"adapts layer add_embedding.linear_1, which the UNet of {TINY_SD} does not have",
    "kohya sgm names": f"which the UNet of {TINY_SD} does not have",
    "sd 1.5 shapes": f"layer {LAYER} maps 320 to 320 features, but in {TINY_SD} it maps 32 to 32: a LoRA for "
    "another model",
}


def write_lora(case: str, folder: Path, good: Path) -> Path:
    """A LoRA folder whose weights file is wrong as ``case`` says."""
    import torch
    from safetensors.torch import save_file

    nan = float("nan")
    file = folder / LORA_FILE
    folder.mkdir(parents=True, exist_ok=True)
    good_bytes = (good / LORA_FILE).read_bytes()
    raw = {
        "truncated": good_bytes[:-64],
        "torn header": good_bytes[:100],
        "not safetensors": b"PK\x03\x04zip",
    }
    if case in raw:
        file.write_bytes(raw[case])
        return file
    te = "text_model.encoder.layers.0.self_attn.q_proj"
    tensors = {
        "no tensors": {},
        "model checkpoint": {"conv_in.weight": torch.zeros(32, 4, 3, 3)},
        "text encoder only": diffusers_pair(f"text_encoder.{te}"),
        "kohya text encoder only": kohya_pair("lora_te_" + te.replace(".", "_")),
        "sdxl text_encoder_2": {**diffusers_pair(f"unet.{LAYER}"), **diffusers_pair(f"text_encoder_2.{te}")},
        "down matrix only": {f"unet.{LAYER}.lora.down.weight": torch.zeros(4, 32)},
        "nan values": diffusers_pair(f"unet.{LAYER}")
        | {f"unet.{LAYER}.lora.up.weight": torch.full((32, 4), nan)},
        "ranks differ": lora_pair(f"unet.{LAYER}", ".lora.down.weight", ".lora.up.weight", rank=4)
        | {f"unet.{LAYER}.lora.up.weight": torch.zeros(32, 8)},
        "sdxl block": diffusers_pair(
            "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q", 1280, 1280
        ),
        "sdxl add_embedding": diffusers_pair("unet.add_embedding.linear_1", 2816, 1280),
        "kohya sgm names": kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640),
        "sd 1.5 shapes": diffusers_pair(f"unet.{LAYER}", 320, 320),
    }[case]
    save_file(tensors, str(file))
    return file


@pytest.mark.parametrize("case", [*BAD_LORAS, *FOREIGN_LORAS])
def test_a_bad_lora_is_refused_in_one_line_naming_its_file(tmp_path, capsys, good_lora, case):
    file = write_lora(case, tmp_path / "lora", good_lora)
    before = file.read_bytes()
    out = tmp_path / "out" / "a.png"
    argv = [
        "generate",
        "--config",
        TINY,
        "--prompt",
        "a giraffe",
        "--lora",
        str(file.parent),
        "--out",
        str(out),
    ]
    expected = {**BAD_LORAS, **FOREIGN_LORAS}[case]
    line = refused(argv, capsys)
    assert line.startswith(f"ccsr: error: {file}: ") and expected in line
    # The file itself in place of its folder: the same line.
    assert refused([*argv[:-4], "--lora", str(file), "--out", str(out)], capsys) == line
    if case in BAD_LORAS:
        assert refused(["export", str(file.parent), "--out", str(tmp_path / "k.safetensors")], capsys) == line
    assert not out.parent.exists() and not (tmp_path / "k.safetensors").exists()
    assert file.read_bytes() == before


def test_a_good_lora_draws_and_its_kohya_export_draws_the_same(tmp_path, capsys, good_lora):
    """ccsr's LoRA loads in diffusers; its kohya export is accepted as well (as diffusers' own
    load_lora_weights accepts that layout), draws the same pixels, and is not exported again."""
    import numpy as np
    from PIL import Image

    def draw(name: str, *lora: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        argv = ["generate", "--config", TINY, "--set", "generator.steps=2", "--prompt", "a giraffe"]
        assert main([*argv, *lora, "--out", str(out)]) == 0
        return np.asarray(Image.open(out), dtype=np.int16)

    kohya = tmp_path / "giraffe-kohya.safetensors"
    assert main(["export", str(good_lora), "--out", str(kohya)]) == 0
    base, lora, exported = (
        draw("base"),
        draw("lora", "--lora", str(good_lora)),
        draw("kohya", "--lora", str(kohya)),
    )
    assert (
        np.abs(lora - base).max() > 10
    )  # the LoRA changes the image, so the comparison below means something
    assert np.abs(exported - lora).max() <= 1  # the same model up to rounding into 8-bit pixels
    line = refused(["export", str(kohya), "--out", str(tmp_path / "again.safetensors")], capsys)
    assert line == f"ccsr: error: {kohya}: already in kohya format; nothing to convert"
    line = refused(["export", str(good_lora), "--out", str(tmp_path)], capsys)
    assert line.startswith(f"ccsr: error: --out {tmp_path} is a folder; ")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "  "], "--prompt is empty"),
        (["--scale", "-1"], "--scale must be within [0, 1], got [-1.0]"),
        (["--scale", "nan"], "--scale must be within [0, 1], got [nan]"),
        (["--scale", "0.5", "inf"], "--scale must be within [0, 1], got [0.5, inf]"),
        (["--num", "0"], "--num must be > 0, got 0"),
        (["--num", "-3"], "--num must be > 0, got -3"),
    ],
)
def test_generate_refuses_bad_prompts_scales_and_counts(tmp_path, capsys, extra, expected):
    out = tmp_path / "a.png"
    line = refused(["generate", "--config", TINY, "--prompt", "a giraffe", "--out", str(out), *extra], capsys)
    assert expected in line
    assert list(tmp_path.iterdir()) == []


def fake_run(root: Path, lora: Path, *sets: str) -> Path:
    """A run directory as far as ``ccsr eval`` looks before it draws: its config and iteration 1's LoRA."""
    import shutil

    from ccsr.config_files import load_config, save_config

    save_config(load_config(TINY, list(sets), class_name="giraffe"), root / "config.yaml")
    shutil.copytree(lora, RunDir(root).lora_dir(1))
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "case, extra, expected",
    [
        ("truncated", [], BAD_LORAS["truncated"]),
        ("sd 1.5 shapes", [], FOREIGN_LORAS["sd 1.5 shapes"]),
        ("good", ["--scales", "nan"], "--scales must be within [0, 1], got [nan]"),
        ("good", ["--scales", "0.5", "-1"], "--scales must be within [0, 1], got [0.5, -1.0]"),
        ("good", ["--iteration", "2"], "--iteration 2: no LoRA for that iteration"),
    ],
)
def test_eval_refuses_bad_input_and_leaves_the_run_as_it_was(
    tmp_path, capsys, good_lora, case, extra, expected
):
    lora = good_lora if case == "good" else write_lora(case, tmp_path / "bad", good_lora).parent
    run = fake_run(tmp_path / "run", lora)
    before = snapshot(run)
    line = refused(["eval", str(run), *extra], capsys)
    assert expected in line
    if case != "good":
        assert line.startswith(f"ccsr: error: {RunDir(run).lora_file(1)}: ")
    assert snapshot(run) == before


def test_eval_refuses_a_run_whose_generator_folder_is_incomplete(tmp_path, capsys, good_lora):
    sd = fake_sd(tmp_path / "sd", without="unet/config.json")
    run = fake_run(tmp_path / "run", good_lora, f"generator.model={sd}")
    before = snapshot(run)
    line = refused(["eval", str(run)], capsys)
    assert line.startswith(f"ccsr: error: generator.model: {sd} holds no unet/config.json")
    assert snapshot(run) == before


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


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_cuda_device_without_a_gpu_is_refused_by_validate_and_run(tmp_path, capsys, device):
    line = refused(run_args(tmp_path / "run", f"device={device}"), capsys)
    assert f"device: {device} asked for, but this machine has no CUDA GPU" in line
    assert not (tmp_path / "run").exists()
    assert refused(["validate", "--config", TINY, "--set", f"device={device}"], capsys) == line


def test_a_previous_lora_of_another_rank_is_refused_before_training(tmp_path, good_lora):
    from ccsr.config_files import load_config
    from ccsr.inputs import UserError
    from ccsr.train import make_job

    cfg = load_config(TINY, ["trainer.rank=8"], class_name="giraffe")
    with pytest.raises(UserError, match=r"this LoRA has rank 4 but trainer.rank is 8") as raised:
        make_job(cfg, [], tmp_path / "out", init_lora=good_lora)
    assert str(raised.value).startswith(str(good_lora / LORA_FILE))
    assert "\n" not in str(raised.value)
