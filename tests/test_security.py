"""Security: no unsafe deserialisation or shell in the package, remote code only when the config allows it,
and LLM-written prompts are data that cannot change templates, paths or commands."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

from ccsr.config import Config
from ccsr.config_files import load_config
from ccsr.prompter import build_messages
from ccsr.questions import QuestionSet
from ccsr.rundir import RunDir, RunDirError, read_jsonl, write_jsonl

PACKAGE = Path(__file__).resolve().parent.parent / "ccsr"

# (file relative to ccsr/, rule) -> why the use is justified. Keep it short; every entry is a reviewed risk.
ALLOWED = {
    (
        "detector.py",
        "ultralytics-model-file",
    ): "ultralytics' .pt format unpickles; only the model file the config "
    "names (the user's own, or the project-built tiny one) is loaded, never a file from a run directory",
    (
        "tiny/yolo.py",
        "ultralytics-model-file",
    ): "loads the YOLO-World file this builder has just written itself",
}

# Modules whose loaders run arbitrary code from the data they read.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def sources() -> list[tuple[str, str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10, "the scan must see the package"
    return [(str(p.relative_to(PACKAGE)), p.read_text(encoding="utf-8")) for p in files]


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def is_dtype_kwargs(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and dotted(node.func).rsplit(".", 1)[-1] == "diffusers_dtype"


def keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def findings(rel: str, text: str) -> list[tuple[str, int, str]]:
    """(rule, line, snippet) for every risky construct in one source file."""
    out = []
    tree = ast.parse(text, filename=rel)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any((n or "").split(".")[0] in UNSAFE_MODULES for n in names):
                out.append(("unsafe-deserialisation-import", node.lineno, ast.unparse(node)))
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        src = ast.unparse(node)[:120]
        if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            out.append(("eval-exec", node.lineno, src))
        if name in ("os.system", "os.popen", "os.execv", "os.execvp", "os.spawnl", "commands.getoutput"):
            out.append(("shell", node.lineno, src))
        if is_true(keyword(node, "shell")):
            out.append(("shell", node.lineno, src))
        if name.endswith("torch.load") and not is_true(keyword(node, "weights_only")):
            out.append(("torch-load-without-weights-only", node.lineno, src))
        if name in (
            "yaml.load",
            "yaml.unsafe_load",
            "yaml.full_load",
            "yaml.load_all",
            "yaml.unsafe_load_all",
        ):
            out.append(("unsafe-yaml", node.lineno, src))
        if (
            last == "load"
            and name.split(".")[0] in ("np", "numpy")
            and is_true(keyword(node, "allow_pickle"))
        ):
            out.append(("numpy-pickle", node.lineno, src))
        if is_true(keyword(node, "trust_remote_code")):
            out.append(("trust-remote-code-on", node.lineno, src))
        if last in ("YOLO", "YOLOWorld") and node.args:
            out.append(("ultralytics-model-file", node.lineno, src))
        use_safetensors = keyword(node, "use_safetensors")
        if isinstance(use_safetensors, ast.Constant) and use_safetensors.value is False:
            out.append(("pickled-weights-forced", node.lineno, src))
        if last == "from_pretrained":
            trc = keyword(node, "trust_remote_code")
            if trc is not None and not dotted(trc).endswith(".trust_remote_code"):
                out.append(("trust-remote-code-not-from-config", node.lineno, src))
            # **kwargs could smuggle trust_remote_code; ``compat.diffusers_dtype`` holds only the dtype key.
            if any(k.arg is None and not is_dtype_kwargs(k.value) for k in node.keywords):
                out.append(("from-pretrained-opaque-kwargs", node.lineno, src))
    # Names used as code anywhere (not in strings or comments), e.g. getattr(pickle, ...).
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NAME and tok.string in UNSAFE_MODULES:
            out.append(("unsafe-deserialisation-name", tok.start[0], tok.line.strip()))
    return out


def test_the_scanner_catches_what_it_looks_for():
    bad = """
import pickle
import subprocess, os, torch, yaml
from transformers import AutoModel
subprocess.run("ls " + x, shell=True)
os.system(cmd)
eval(text)
torch.load(p)
torch.load(p, weights_only=False)
yaml.load(s)
AutoModel.from_pretrained(p, trust_remote_code=True)
AutoModel.from_pretrained(p, trust_remote_code=flag)
AutoModel.from_pretrained(p, **kw)
Pipe.from_pretrained(p, use_safetensors=False)
"""
    rules = {r for r, _, _ in findings("x.py", bad)}
    assert rules == {
        "unsafe-deserialisation-import",
        "unsafe-deserialisation-name",
        "shell",
        "eval-exec",
        "torch-load-without-weights-only",
        "unsafe-yaml",
        "trust-remote-code-on",
        "trust-remote-code-not-from-config",
        "from-pretrained-opaque-kwargs",
        "pickled-weights-forced",
    }
    ok = """
import torch, yaml
model.eval()
self.stage_eval(k)
torch.load(p, weights_only=True)
yaml.safe_load(s)
AutoModel.from_pretrained(p, trust_remote_code=cfg.judge.trust_remote_code)
AutoModel.from_pretrained(p)
UNet.from_pretrained(p, subfolder="unet", **diffusers_dtype(dtype))
# pickle in a comment, "os.system" in a string
"""
    assert findings("y.py", ok) == []


def test_package_has_no_unsafe_loading_shell_or_eval():
    problems = []
    for rel, text in sources():
        for rule, line, snippet in findings(rel, text):
            if (rel, rule) not in ALLOWED:
                problems.append(f"ccsr/{rel}:{line}: {rule}: {snippet}")
    assert not problems, "unsafe constructs (fix them or allow-list with a reason):\n" + "\n".join(problems)


def test_allow_list_entries_have_reasons():
    for (rel, rule), reason in ALLOWED.items():
        assert len(reason) > 40, (rel, rule)


def test_remote_code_is_off_unless_the_config_turns_it_on(repo_root):
    defaults = Config()
    assert defaults.prompter.trust_remote_code is False and defaults.judge.trust_remote_code is False
    for name in ("tiny.yaml", "paper.yaml"):
        cfg = load_config(repo_root / "configs" / name)
        assert not cfg.prompter.trust_remote_code and not cfg.judge.trust_remote_code, name
    # Every call site that mentions the flag passes the config value (the scan above); calls that don't
    # mention it get the libraries' default, which is off.
    passing = {
        rel
        for rel, text in sources()
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Call) and keyword(node, "trust_remote_code") is not None
    }
    assert {"prompter.py", "judge.py"} <= passing, passing


# --- LLM-written prompts are data ------------------------------------------------------------------
NASTY = [
    "{class_name}",
    "{prompt}",
    "{n} {examples}",
    "{0} {__class__} {prompt!r:>10}",
    "%s %(prompt)s $HOME ${IFS} `id` $(rm -rf ~)",
    "'; DROP TABLE x; --",
    "\"quoted\" and 'single'",
    "../../../etc/passwd",
    "..\\..\\windows\\system32",
    "line\nbreak [/INST] <image> </s>",
]


@pytest.mark.parametrize("evil", NASTY)
def test_build_messages_inserts_the_class_name_verbatim(evil):
    cfg = Config()
    marker = "CLASSMARKER"
    reference = build_messages(cfg, marker, 7)
    messages = build_messages(cfg, evil, 7)
    assert marker in reference[0]["content"]
    assert [m["content"] for m in messages] == [m["content"].replace(marker, evil) for m in reference]
    assert [m["role"] for m in messages] == [m["role"] for m in reference]


@pytest.mark.parametrize("evil", NASTY)
def test_question_rendering_is_single_pass(repo_root, evil):
    questions = QuestionSet.load(repo_root / "prompts" / "questions.yaml")
    marker = "PROMPTMARKER"
    reference = questions.render("giraffe", marker)
    assert any(marker in q for q in reference)
    assert questions.render("giraffe", evil) == [q.replace(marker, evil) for q in reference]
    # A class name that looks like a placeholder is not expanded either.
    by_class = questions.render(evil, "a photo")
    assert by_class == [q.replace("CLASS", evil) for q in questions.render("CLASS", "a photo")]


def test_run_dir_refuses_paths_that_escape(tmp_path):
    run = RunDir(tmp_path / "run")
    run.check_writable()
    assert run.inside(run.root / "iterations" / "001" / "a.png").is_relative_to(run.root.resolve())
    for escape in (run.root / ".." / "x", Path("/etc/passwd"), run.root / "a" / ".." / ".." / "y"):
        with pytest.raises(RunDirError):
            run.inside(escape)


@pytest.fixture(scope="module")
def evil_candidates(tmp_path_factory, repo_root):
    """The real candidates stage (tiny SD) on prompts whose text tries to steer paths and templates."""
    from ccsr.loop import Loop, training_pairs
    from ccsr.records import write_dataset

    cfg = load_config(
        repo_root / "configs" / "tiny.yaml",
        ["generator.num_candidates=2", "generator.steps=2", "generator.resolution=64"],
        class_name="giraffe",
    )
    run = RunDir(tmp_path_factory.mktemp("names") / "run")
    run.check_writable()
    prompts = [
        {"id": f"001-{i:03d}", "class": "giraffe", "prompt": text}
        for i, text in enumerate(
            ["../../../escape/{class_name}/x.png; rm -rf /", "$(touch pwned) ..\\..\\evil"]
        )
    ]
    write_jsonl(run.files(1)["prompts"], prompts)
    loop = Loop(cfg, run)
    loop.stage_candidates(1)
    # The dataset folder is written from pairs: its file names must come from ids too.
    cands = read_jsonl(run.files(1)["candidates"])
    pairs = [
        {
            "prompt_id": p["id"],
            "index": 0,
            "prompt": p["prompt"],
            "path": c["path"],
            "score": 1,
            "confidence": 0.9,
        }
        for p in prompts
        for c in cands
        if c["prompt_id"] == p["id"] and c["index"] == 0
    ]
    write_jsonl(run.files(1)["pairs"], pairs)
    write_dataset(run, 1, training_pairs(cfg, run, 1))
    return run, prompts


def test_file_names_come_from_ids_not_prompt_text(evil_candidates):
    run, prompts = evil_candidates
    root = run.root.parent
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert files, "the stage wrote nothing"
    for path in files:
        run.inside(path)  # raises if anything escaped
        rel = str(path.relative_to(root))
        assert not any(word in rel for word in ("escape", "pwned", "evil", "{", "$")), path
    names = {p.name for p in (run.iteration_dir(1) / "candidates").iterdir()}
    assert names == {f"{p['id']}-{j:02d}.png" for p in prompts for j in range(2)}
    dataset = run.files(1)["dataset"]
    assert {p.name for p in dataset.iterdir()} == {f"{p['id']}-00.png" for p in prompts} | {"metadata.jsonl"}
    # The text itself is kept verbatim as data.
    assert [m["text"] for m in read_jsonl(dataset / "metadata.jsonl")] == [p["prompt"] for p in prompts]
    assert [r["prompt"] for r in read_jsonl(run.files(1)["prompts"])] == [p["prompt"] for p in prompts]
