"""What ``make proof`` measures, fixed before the reported run: prompts, seeds, loop seeds, variants.

Three disjoint sets of prompts of the class (circle), none of which the loop trains on as written:
- **target prompts**, what the result is about: the two weak bindings (purple: mis-captioned in the base's
  data; green: rare in it) at the held-out (count, background) combinations, in all four templates: 24
  prompts. The loop never prompts a held-out combination, and the gate never sees one.
- **guard prompts**, the do-no-harm checks: the class's other colours at the held-out combinations, and the
  other classes in the weak colours at the same combinations.
- **gate prompts** (the loop's ``prompter.validation_file``): the weak colours and some other colours at the
  loop's own combinations, in the first template. The loop's prompter never returns a validation prompt, so
  the gate measures prompts the loop did not train on, of the kind it trains on.

Every model draws every target prompt at every seed of the seed set and every guard prompt at the first
``guard_seeds`` of them; each image is graded by ``experiments.shapes.evaluator``.

Variants are run per loop seed: those in ``SEEDED`` at every loop seed of the protocol (their mean is the
headline, each seed is reported), the others at the first loop seed only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from experiments.shapes import world


@dataclass(frozen=True)
class Protocol:
    class_name: str = "circle"
    # colour -> what kind of weakness the base model was given (experiments.shapes.base_model)
    weaknesses: tuple[tuple[str, str], ...] = (
        ("purple", "mis-captioned: 75% of the base's purple-circle captions show another colour"),
        ("green", "rare: the base saw ~30 green circles against ~600 of every other colour"),
    )
    final_seeds: range = range(7000, 7016)  # the reported run's image seeds: no run has drawn them
    dev_seeds: range = range(500, 516)  # the seeds settings are chosen on (--dev)
    guard_seeds: int = 8  # the guard prompts are drawn at the first 8 seeds of the set
    loop_seeds: tuple[int, ...] = (2001, 2002, 2003)  # the reported run's loop seeds (config seed)
    dev_loop_seeds: tuple[int, ...] = (1, 2, 3)
    best_of_n: int = 10
    best_of_n_seeds: int = 4  # best-of-n draws the target prompts at the first 4 seeds
    n_gate_prompts: int = 12
    non_inferiority_margin: float = -3.0  # points: the lower end of each guard's interval must stay above
    primary_metric: str = "exact (%): count, colour and background right, nothing else, on the target prompts"

    @property
    def colours(self) -> list[str]:
        return [c for c, _ in self.weaknesses]

    def target_specs(self) -> list[world.SceneSpec]:
        return [s for s in world.validation_specs(self.class_name) if s.colour in self.colours]

    def target_prompts(self) -> list[str]:
        return [world.caption(s, t) for s in self.target_specs() for t in range(len(world.TEMPLATES))]

    def guard_prompts(self) -> dict[str, list[str]]:
        other_colours = [s for s in world.validation_specs(self.class_name) if s.colour not in self.colours]
        other_classes = [
            world.SceneSpec(shape, s.count, s.colour, s.background)
            for shape in world.CLASSES
            if shape != self.class_name
            for s in self.target_specs()
        ]
        return {
            f"{self.class_name}, other colours": [world.caption(s) for s in other_colours],
            "other classes, weak colours": [world.caption(s) for s in other_classes],
        }

    def gate_prompts(self) -> list[str]:
        loop_specs = world.training_specs(self.class_name)
        weak = [s for s in loop_specs if s.colour in self.colours]
        others = [s for s in loop_specs if s.colour not in self.colours]
        others = random.Random(f"gate:{self.class_name}").sample(others, self.n_gate_prompts - len(weak))
        return [world.caption(s) for s in weak + others]

    def plan(self, seeds: range) -> list[tuple[str, list[int]]]:
        """What every final model draws: (prompt, its seeds), the target prompts first."""
        guards = [p for group in self.guard_prompts().values() for p in group]
        return [(p, list(seeds)) for p in self.target_prompts()] + [
            (p, list(seeds)[: self.guard_seeds]) for p in guards
        ]

    def colour_of(self, prompt: str) -> str:
        spec = world.parse_caption(prompt)
        if spec is None:
            raise ValueError(f"{prompt!r} is not a caption of the shapes grammar")
        return spec.colour


PROTOCOL = Protocol()

RANDOM_JUDGE = "judge.backend=experiments.shapes.backends:RandomJudge"
SFT_BATCH = "trainer.batch_size=8"  # 8 images a step, as a DPO step of the shapes config's 4 pairs
# The paper's recipe over configs/shapes.yaml: the single best image per prompt, the plain denoising loss.
PAPER_RECIPE = [
    "filter.top_k=1",
    "filter.min_score=null",
    "trainer.prior_weight=0",
    "trainer.objective=sft",
    SFT_BATCH,
    "trainer.reward_weighted=false",
]
REPLAY = [
    "trainer.prior_weight=1",
    "trainer.prior_images=60",
    "trainer.prior_prompts="
    + json.dumps([world.caption(spec) for spec in world.training_specs(PROTOCOL.class_name)]),
]
PERFECT_JUDGE = "judge.model=shapes-measurement"
WEAK_JUDGE = "judge.model=shapes-measurement+flip=0.25"

# name -> (what it is, kind, overrides of configs/shapes.yaml). Kinds: "measure" (the base, drawn and graded),
# "best-of-n", "loop" (a `ccsr run`, then its champion drawn), "control" (the matched control of the ccsr run of
# the same loop seed, experiments.shapes.control), "ground-truth" (after the ccsr run of the first loop seed).
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "base": ("the base model", "measure", []),
    "best-of-10": (
        "per prompt and seed, the judge's and detector's pick of 10 base images (no training)",
        "best-of-n",
        [],
    ),
    "ccsr": (
        "the loop as configured (configs/shapes.yaml): its noisy judge, Diffusion-DPO, the testing gate",
        "loop",
        [],
    ),
    "control": (
        "matched control: the ccsr loop with random picks, as many per prompt and iteration as ccsr made",
        "control",
        [],
    ),
    "judge-perfect": ("the ccsr loop, the judge's answers not flipped", "loop", [PERFECT_JUDGE]),
    "judge-0.25": ("the ccsr loop, a quarter of the judge's answers flipped", "loop", [WEAK_JUDGE]),
    "ground-truth": (
        "one LoRA on correct renders of the first ccsr run's prompts, that run's total steps",
        "ground-truth",
        [],
    ),
    "paper": ("the paper's recipe: one image per prompt, plain denoising loss", "loop", PAPER_RECIPE),
    "no-judge": ("the ccsr loop with a judge that answers at random", "loop", [RANDOM_JUDGE]),
    "no-detector": (
        "detector threshold 0: no image is filtered out",
        "loop",
        ["filter.detection_threshold=0"],
    ),
    "no-gate": ("every LoRA is accepted, better or not", "loop", ["gate.enabled=false"]),
    "top3-replay": (
        "the ccsr picks with the plain loss, plus replay of 60 base images of loop captions",
        "loop",
        ["trainer.objective=sft", SFT_BATCH, *REPLAY],
    ),
}
SEEDED = ("ccsr", "control")  # run at every loop seed; the others at the first
DEFAULT_VARIANTS = ["base", "best-of-10", "ccsr", "control", "judge-perfect", "judge-0.25", "ground-truth"]
QUICK_VARIANTS = ["base", "best-of-10", "ccsr", "control", "ground-truth"]
# The judge-quality sweep: the variants that differ from ccsr in the judge's flip rate only.
SWEEP = {"judge-perfect": 0.0, "ccsr": None, "judge-0.25": 0.25}  # None: the config's own rate


def task(variant: str, loop_seed: int | None) -> str:
    return variant if loop_seed is None else f"{variant}@{loop_seed}"


def tasks(variants: list[str], loop_seeds: tuple[int, ...]) -> list[str]:
    """The units of work: one per variant and loop seed it runs at (none for the measurements)."""
    out = []
    for v in variants:
        kind = VARIANTS[v][1]
        if kind in ("measure", "best-of-n", "ground-truth"):
            out.append(v)
        else:
            out += [task(v, seed) for seed in (loop_seeds if v in SEEDED else loop_seeds[:1])]
    return out


def split(name: str) -> tuple[str, int | None]:
    variant, _, seed = name.partition("@")
    return variant, int(seed) if seed else None


def needs(name: str, loop_seeds: tuple[int, ...]) -> str | None:
    """The task whose results ``name`` reads (it starts after it), or None."""
    variant, seed = split(name)
    if variant == "best-of-10":
        return "base"
    if variant == "ground-truth":
        return task("ccsr", loop_seeds[0])
    if variant == "control":
        return task("ccsr", seed)
    return None


def check_variants(variants: list[str]) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for v in ("best-of-10", "ground-truth", "control"):
        needed = "base" if v == "best-of-10" else "ccsr"
        if v in variants and needed not in variants and needed != "base":
            raise ValueError(f"variant {v} reads the {needed} run's results: add {needed} to --variants")
