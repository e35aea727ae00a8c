"""The proof's matched control: the ccsr loop with the judge's ranking replaced by a random one.

A control that differs from the ccsr variant in one thing only, so that ccsr minus control measures what the
judge's ranking is worth. Everything else is the same run: the config (judge, gate, objective, steps,
detector), the loop seed, and so the prompts of every iteration; and the same number of training pairs, prompt
by prompt, iteration by iteration, as the reference run (the ccsr variant at the same loop seed) made.

The one change is in the filter stage: where the reference made m pairs for a prompt, the control picks m
winners uniformly among this run's candidates of the prompt that pass the detector, and for Diffusion-DPO
gives each a loser drawn uniformly from the prompt's other candidates. The judge still scores every image and
the gate still decides on its evaluation, as in the reference run. A random-answer judge (``RandomJudge``)
is no such control: its random scores rarely reach the filter's minimum score, so it trains on a tenth of the
pairs, and its random gate accepts at random.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ccsr.config import Config
from ccsr.config_files import save_config
from ccsr.loop import Loop
from ccsr.records import (
    Candidate,
    Detection,
    Judgment,
    Pair,
    Preference,
    PromptRecord,
    read_records,
    write_dataset,
    write_preference_dataset,
    write_records,
)
from ccsr.rundir import RunDir, run_lock
from ccsr.seeds import derive_seed
from ccsr.selection import by_prompt
from ccsr.train import training_pairs

logger = logging.getLogger(__name__)


def reference_counts(reference: RunDir, k: int, objective: str) -> dict[str, tuple[str, int]]:
    """Per prompt id of the reference run's iteration k: its prompt and how many training examples it made
    (preference pairs for DPO, picks otherwise)."""
    files = reference.files(k)
    if not files["pairs"].exists():
        raise FileNotFoundError(f"{reference.root}: iteration {k} has no filter stage to match")
    prompts = {p.id: p.prompt for p in read_records(files["prompts"], PromptRecord)}
    made = (
        read_records(files["preferences"], Preference)
        if objective == "dpo"
        else read_records(files["pairs"], Pair)
    )
    counts: dict[str, int] = {}
    for record in made:
        counts[record.prompt_id] = counts.get(record.prompt_id, 0) + 1
    return {pid: (prompts[pid], n) for pid, n in counts.items()}


@dataclass
class ControlLoop(Loop):
    """``Loop`` whose filter stage picks at random, as many as ``reference`` did (see the module docstring)."""

    reference: RunDir | None = None

    def _select_pairs(self, k: int) -> dict:
        if self.reference is None:
            raise ValueError("ControlLoop needs the reference run it is matched to")
        cfg, files = self.cfg, self.run.files(k)
        prompts = {p.id: p.prompt for p in read_records(files["prompts"], PromptRecord)}
        paths = {(c.prompt_id, c.index): c.path for c in read_records(files["candidates"], Candidate)}
        scores = {(j.prompt_id, j.index): j.score for j in read_records(files["judgments"], Judgment)}
        detected = by_prompt(read_records(files["detections"], Detection))
        wanted = reference_counts(self.reference, k, cfg.trainer.objective)
        rng = random.Random(derive_seed(cfg.seed, "matched-control", k))
        pairs, preferences, short = [], [], 0
        for pid, prompt in prompts.items():
            if pid not in wanted:
                continue
            if wanted[pid][0] != prompt:
                raise ValueError(
                    f"iteration {k}, prompt {pid}: {prompt!r} here, {wanted[pid][0]!r} in the reference run "
                    f"{self.reference.root}: the control must run the reference's config and loop seed"
                )
            n = wanted[pid][1]
            passing = sorted(
                d.index for d in detected.get(pid, []) if d.confidence >= cfg.filter.detection_threshold
            )
            winners = rng.sample(passing, min(n, len(passing)))
            short += n - len(winners)
            for w in winners:
                pairs.append(
                    Pair(pid, w, prompt, paths[(pid, w)], scores[(pid, w)], _confidence(detected[pid], w))
                )
            if cfg.trainer.objective != "dpo":
                continue
            others = [i for (p, i) in paths if p == pid and i not in winners]
            for w, loser in zip(winners, rng.sample(others, min(len(winners), len(others))), strict=False):
                preferences.append(
                    Preference(
                        prompt_id=pid,
                        prompt=prompt,
                        winner_index=w,
                        loser_index=loser,
                        winner_path=paths[(pid, w)],
                        loser_path=paths[(pid, loser)],
                        winner_score=scores[(pid, w)],
                        loser_score=scores[(pid, loser)],
                    )
                )
        write_records(files["pairs"], pairs)
        write_records(files["preferences"], preferences)
        write_dataset(self.run, k, training_pairs(cfg, self.run, k))
        write_preference_dataset(self.run, k, preferences)
        return {
            "count": len(pairs),
            "prompts": len(prompts),
            "preferences": len(preferences),
            "matched_to": sum(n for _, n in wanted.values()),
            "short": short,  # the reference's count could not be met: too few candidates passed the detector
        }


def _confidence(detections: list[Detection], index: int) -> float:
    return next(d.confidence for d in detections if d.index == index)


def run_control(cfg: Config, run_dir: Path, reference_dir: Path, iterations: int) -> RunDir:
    """The matched control of the run in ``reference_dir``, into ``run_dir`` (resumed when it is there)."""
    run = RunDir(run_dir)
    run.check_writable()
    with run_lock(run):
        if not run.config_path.exists():
            save_config(cfg, run.config_path)
        run.event("start", iterations=iterations, matched_to=str(reference_dir))
        ControlLoop(cfg, run, reference=RunDir(reference_dir)).run_iterations(iterations)
        run.event("finished", iterations=iterations)
    return run
