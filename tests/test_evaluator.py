"""The proof's evaluator: a second instrument, stricter than the loop's measurement where it is lenient."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from experiments.shapes import evaluator, world


def test_exact_renders_are_graded_exact():
    rng = random.Random(0)
    graded = []
    for shape in world.CLASSES:
        for _ in range(25):
            spec = rng.choice(world.all_specs(shape))
            image = world.render(spec, world.place_objects(spec, rng))
            graded.append(evaluator.grade(spec, evaluator.evaluate(image)).exact)
    assert sum(graded) / len(graded) >= 0.98


@pytest.mark.parametrize(
    "kind",
    [
        "hollow rings (hole 0.3-0.7 r)",
        "two-tone: half purple, half orange",
        "blue-violet/indigo for purple",
        "two circles merged into one blob",
        "extra object of another class",
    ],
)
def test_probes_of_known_truth_are_graded_wrong_where_they_are(kind):
    rows = {r["probe"]: r for r in evaluator.validation_table(n=12)}
    assert kind in rows, sorted(rows)
    assert rows[kind]["evaluator"] >= 0.9, rows[kind]  # share of probes graded as their truth


def test_a_ring_is_no_circle_for_the_evaluator_while_the_loop_measurement_takes_it():
    from PIL import Image, ImageDraw

    spec = world.SceneSpec("circle", 1, "purple", "white")
    big = Image.new("RGB", (256, 256), world.BACKGROUNDS["white"])
    pen = ImageDraw.Draw(big)
    pen.ellipse((70, 70, 186, 186), fill=world.COLOURS["purple"])
    pen.ellipse((100, 100, 156, 156), fill=world.BACKGROUNDS["white"])
    image = big.resize((64, 64), Image.Resampling.BOX)
    grade = evaluator.grade(spec, evaluator.evaluate(image))
    assert not grade.exact and grade.ring
    assert world.accuracy(spec, world.measure(image)).exact  # the leniency the evaluator exists for


def test_grade_image_refuses_a_prompt_that_is_no_caption():
    image = world.render(world.SceneSpec("star", 1, "red", "gray"), [world.PlacedObject(32, 32, 14, 0.0)])
    with pytest.raises(ValueError, match="not a caption"):
        evaluator.grade_image("a photo of a giraffe", image)


def test_no_loop_role_imports_the_evaluator():
    source = Path("experiments/shapes/backends.py").read_text(encoding="utf-8")
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    assert not any("evaluator" in n for n in names), names
