"""Checks on resume: an iteration's damaged or missing work found, and the loop made to redo just that.

``verify`` runs on the main process before any stage (``Loop.run_iterations``), once per iteration on disk:

- candidate images are checked against their recorded checksums and redrawn from their seeds (the same
  pixels, so later records stay valid), also while the candidates stage is still under way, so a damaged
  image is never handed to the judge;
- a LoRA that fails its checksum is deleted and its train and eval stages reopened;
- an ``eval.json`` that no longer reads reopens the eval stage;
- a finished stage whose records are incomplete (a damaged line was dropped) is reopened with every stage
  after it, and its stage function redoes only the missing units.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from typing import Any

from ccsr.config import Config
from ccsr.devices import free_memory
from ccsr.distributed import read_committed
from ccsr.records import Candidate, Judgment, PromptRecord, read_records, write_records
from ccsr.rundir import STAGES, RunDir, atomic_save_image, read_json, sha256_file
from ccsr.selection import by_prompt

logger = logging.getLogger(__name__)


def verify(cfg: Config, run: RunDir, k: int, load: Callable[[str], Any]) -> None:
    """Repair iteration k as the module docstring says; ``load(role)`` builds the generator for a redraw.
    Every repair is logged and recorded as a "repair" event."""
    done = run.stages_done(k)
    files = run.files(k)
    candidates = read_committed(files["candidates"], Candidate)  # the ranks' shards too
    bad = {c.prompt_id for c in candidates if c.sha256 and sha256_file(run.root / c.path) != c.sha256}
    if bad:
        logger.warning("iteration %d: %d prompts have damaged candidate images; redrawing", k, len(bad))
        run.event("repair", iteration=k, what="candidates", prompts=sorted(bad))
        redraw(run, k, bad, load)
    lora_sha = done.get("train", {}).get("lora_sha256")
    if lora_sha and sha256_file(run.lora_file(k)) != lora_sha:
        logger.warning("iteration %d: LoRA fails its checksum; retraining", k)
        run.event("repair", iteration=k, what="lora")
        shutil.rmtree(run.lora_dir(k), ignore_errors=True)
        run.unmark(k, ("train", "eval"))
    if "eval" in done and not done["eval"].get("skipped") and run.eval_path(k).exists():
        if read_json(run.eval_path(k)) is None:
            run.unmark(k, ("eval",))
    expected = {
        "candidates": len(read_records(files["prompts"], PromptRecord)) * cfg.generator.num_candidates,
        "judge": len(candidates),
    }
    counts = {"candidates": len(candidates), "judge": len(read_records(files["judgments"], Judgment))}
    for i, stage in enumerate(STAGES):
        if stage in expected and stage in done and counts[stage] < expected[stage]:
            logger.warning("iteration %d: %s records are incomplete; redoing the missing ones", k, stage)
            run.event("repair", iteration=k, what=stage)
            run.unmark(k, STAGES[i:])
            break


def redraw(run: RunDir, k: int, prompt_ids: set[str], load: Callable[[str], Any]) -> None:
    """The candidate images of ``prompt_ids`` drawn again from their recorded seeds, LoRA and scale."""
    files = run.files(k)
    prompts = {p.id: p.prompt for p in read_records(files["prompts"], PromptRecord)}
    # The file is rewritten whole, with the ranks' shards in it: the next merge counts each record once.
    records = read_committed(files["candidates"], Candidate)
    grouped = by_prompt(records)
    generator = load("generator")
    for pid in sorted(prompt_ids):
        group = sorted(grouped[pid], key=lambda c: c.index)
        lora = run.root / group[0].lora if group[0].lora else None
        images = generator.images([prompts[pid]] * len(group), [c.seed for c in group], lora, group[0].scale)
        for c, image in zip(group, images, strict=True):
            atomic_save_image(run.inside(run.root / c.path), image)
            if sha256_file(run.root / c.path) != c.sha256:
                logger.warning("%s: redrawn image differs from the recorded one", c.path)
                c.sha256 = sha256_file(run.root / c.path)
    write_records(files["candidates"], records)
    generator.close()
    free_memory()
