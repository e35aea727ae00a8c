"""The package's layers, read from the import statements of every module under ``ccsr/`` (no module is run).

- ``ccsr/models.py`` is the one runtime door to the embedded tiny builders (``ccsr.tiny``).
- The tiny builders are fixtures below the role backends: they import none of them, so a backend can use a
  tiny model's helpers but never the other way round.
- The package ships the runtime only: nothing in it imports the benchmarks, the experiments or the tests,
  which live beside it in the repository and are not in the wheel.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ccsr"

TINY = "ccsr.tiny"
TINY_DOOR = "models.py"
ROLE_BACKENDS = (
    "ccsr.detector",
    "ccsr.generator",
    "ccsr.judge",
    "ccsr.prompter",
    "ccsr.judge_vllm",
    "ccsr.prompter_vllm",
    "ccsr.evaluation",
    "ccsr.loop",
    "ccsr.trainer",
)
OUTSIDE_THE_PACKAGE = ("benchmarks", "experiments", "tests")


def imported_names(path: Path, source_root: Path) -> set[str]:
    """Every dotted name the import statements of the module at ``path`` reach, at any depth (function-level
    imports too); ``source_root`` is the folder its top-level package sits in.

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a module); relative imports are resolved
    against the module's own package, so ``from . import detector`` inside ``ccsr/`` yields ``ccsr.detector``.
    """
    package = path.relative_to(source_root).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def reaches(names: set[str], target: str) -> bool:
    return any(name == target or name.startswith(target + ".") for name in names)


def package_imports() -> dict[str, set[str]]:
    """Module path relative to ``ccsr/`` (``"tiny/yolo.py"``) -> the names it imports."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10, "the scan must see the package"
    return {p.relative_to(PACKAGE).as_posix(): imported_names(p, PACKAGE.parent) for p in files}


def is_tiny(rel: str) -> bool:
    return rel.startswith("tiny/")


def test_imported_names_reads_every_kind_of_import(tmp_path):
    """Without this, an empty scan could mean a blind reader rather than a clean package."""
    package = tmp_path / "ccsr"
    (package / "tiny").mkdir(parents=True)
    source = (
        "import os.path\n"
        "from ccsr import detector\n"
        "from . import clip\n"
        "from ..loop import Loop\n"
        "def later():\n"
        "    from benchmarks.run import main\n"
    )
    (package / "tiny" / "m.py").write_text(source, encoding="utf-8")
    names = imported_names(package / "tiny" / "m.py", tmp_path)
    assert {"os.path", "ccsr.detector", "ccsr.tiny.clip", "ccsr.loop.Loop", "benchmarks.run.main"} <= names
    assert reaches(names, "ccsr.loop") and reaches(names, "benchmarks") and not reaches(names, "ccsr.tin")


def test_only_models_py_reaches_the_tiny_builders():
    offenders = sorted(
        rel
        for rel, names in package_imports().items()
        if rel != TINY_DOOR and not is_tiny(rel) and reaches(names, TINY)
    )
    assert offenders == [], f"import ccsr.tiny through ccsr/models.py only: {offenders}"


def test_the_tiny_builders_import_no_role_backend():
    offenders = sorted(
        f"{rel} -> {backend}"
        for rel, names in package_imports().items()
        if is_tiny(rel)
        for backend in ROLE_BACKENDS
        if reaches(names, backend)
    )
    assert offenders == [], f"the tiny builders must not stand on the backends: {offenders}"


def test_the_package_imports_no_benchmark_experiment_or_test():
    offenders = sorted(
        f"{rel} -> {outside}"
        for rel, names in package_imports().items()
        for outside in OUTSIDE_THE_PACKAGE
        if reaches(names, outside)
    )
    assert offenders == [], f"the package ships the runtime only: {offenders}"
