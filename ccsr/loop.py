"""The CCSR loop, stage-major: each stage loads its model once, does all its work for the iteration, frees it.

One iteration k (paper section 3):
  prompts -> candidates -> judge -> filter (best score, detector >= threshold) -> train (LoRA) -> eval.

Every stage and, inside a stage, every unit (one prompt's candidates, one prompt's judgments, one prompt's
detections) is committed before the next starts, so a restart continues where the previous process stopped.
The rules live elsewhere: the optimal image in ``ccsr.selection``, the improvement gate in ``ccsr.gate``, the
evaluation in ``ccsr.evaluation``, the run directory's files and records in ``ccsr.rundir``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ccsr import gate, train
from ccsr.backends import load_backend
from ccsr.config import Config, resolve_data_path
from ccsr.console import CONSOLE, bar, duration
from ccsr.devices import free_memory, in_batches, keep_cpu_threads
from ccsr.distributed import Ranks, merge_shards, positions, read_committed
from ccsr.roles import Judge, JudgeRequest
from ccsr.rundir import (
    STAGES,
    Candidate,
    Detection,
    Judgment,
    PromptRecord,
    RunDir,
    append_records,
    atomic_save_image,
    atomic_write_json,
    derive_seed,
    read_json,
    read_records,
    sha256_file,
    write_dataset,
    write_preference_dataset,
    write_records,
)
from ccsr.selection import BELOW_MIN_SCORE, best_tied, by_prompt, preference_pairs, select_pairs
from ccsr.train import training_pairs

logger = logging.getLogger(__name__)


class StopRequested(Exception):
    """Raised at a unit boundary when a stop was asked for (signal or stop file)."""


def stage_line(stage: str, info: dict, seconds: float, root: Path) -> str:
    """The terminal's line for a finished stage (``info``: what the stage recorded): its figures and time."""
    took = duration(seconds)
    if stage == "prompts":
        dropped = [f"{n} {why.replace('_', '-')}" for why, n in info.get("dropped", {}).items() if n]
        calls = info.get("attempts", 0)
        text = f"prompts: {info['count']} written in {took} ({calls} LLM call{'' if calls == 1 else 's'}"
        return text + (f"; dropped {', '.join(dropped)})" if dropped else ")")
    if stage == "candidates":
        lora = Path(info["lora"]) if info.get("lora") else None
        if lora is not None and lora.is_relative_to(root):
            lora = lora.relative_to(root)
        model = f"LoRA {lora}" if lora else "the base model"
        return f"candidates: {info['count']} images in {took} (with {model})"
    if stage == "judge":
        text = f"judge: {info['count']} images scored in {took}"
        if info.get("mean_score") is not None:
            text += f", mean score {info['mean_score']:.2f}"
        return text + (f", {info['nan_answers']} answers unreadable" if info.get("nan_answers") else "")
    if stage == "filter":
        prompts = info.get("prompts", 0)
        kept = prompts - info.get("prompts_without_pair", 0)
        text = f"filter: {kept} of {prompts} prompts kept, {info['count']} pairs"
        if info.get("preferences"):
            text += f", {info['preferences']} preference pairs"
        return f"{text} in {took}"
    if stage == "train":
        if info.get("skipped"):
            return f"train: skipped, {info.get('reason')}"
        data = (
            f"{info['preferences']} preference pairs" if "preferences" in info else f"{info['pairs']} pairs"
        )
        return f"train: {info['steps']} steps on {data}, loss {info['final_loss']:.4f} in {took}"
    if stage == "eval":
        if info.get("skipped"):
            return f"eval: skipped, {info.get('reason')}; gate: rejected"
        clip = ""
        if info.get("clip_score") is not None and info.get("base_clip_score") is not None:
            clip = f", CLIP {info['clip_score']:.2f} (base {info['base_clip_score']:.2f})"
        verdict = info["gate"]
        return (
            f"eval: best scale {info['best_scale']:g}, win-rate {info['win_rate']:.2f}{clip} in {took}; "
            f"gate: {'accepted' if verdict['accepted'] else 'rejected'} ({verdict['reason']})"
        )
    return f"{stage}: done in {took}"


def _open_image(run: RunDir, rel_path: str):
    from PIL import Image

    return Image.open(run.root / rel_path).convert("RGB")


def _questions(cfg: Config):
    from ccsr.questions import QuestionSet

    return QuestionSet.load(resolve_data_path(cfg.judge.questions))


@dataclass
class Loop:
    cfg: Config
    run: RunDir
    should_stop: Callable[[], bool] = lambda: False
    # The daemon waits this long (doubling, at most an hour) after an iteration that got no usable prompt.
    backoff_seconds: float = 0.0
    model_seconds: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Under a launcher, this process's rank (``ccsr.distributed``): the main one writes the run's records.
    ranks: Ranks = field(default_factory=Ranks)

    def stages(self) -> tuple[tuple[str, Callable[[int], dict]], ...]:
        """The stages of one iteration in order, each with the method that does its work (``STAGES``)."""
        return (
            ("prompts", self.stage_prompts),
            ("candidates", self.stage_candidates),
            ("judge", self.stage_judge),
            ("filter", self.stage_filter),
            ("train", self.stage_train),
            ("eval", self.stage_eval),
        )

    # --- the loop ------------------------------------------------------------------------------
    def run_iterations(self, iterations: int) -> None:
        if self.ranks.is_main:
            self.run.clean_temp()
            for k in self.run.iterations():
                self.verify(k)
        self.ranks.barrier()
        empty_streak = 0
        for k in range(1, iterations + 1):
            if self.run.iteration_complete(k):
                continue
            self.run_iteration(k)
            if self.run.stages_done(k)["prompts"].get("count", 1) == 0:
                empty_streak += 1
                self._back_off(k, empty_streak)
            else:
                empty_streak = 0

    def run_iteration(self, k: int) -> None:
        self.run.iteration_dir(k).mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        for stage, work in self.stages():
            if self.run.is_done(k, stage):
                continue
            self._beat(k, stage)
            self._stop_if_requested()
            logger.info("iteration %d: %s", k, stage)
            self._event("stage_start", iteration=k, stage=stage)
            self.model_seconds[stage] = 0.0
            start = time.perf_counter()
            info = work(k)  # every rank; the main one's answer is the stage's record
            seconds = time.perf_counter() - start
            free_memory()
            self.stage_seconds[stage] = seconds
            if self.ranks.is_main:
                self.run.mark_done(k, stage, seconds=round(seconds, 3), **info)
                self.run.event("stage_end", iteration=k, stage=stage, seconds=round(seconds, 3), **info)
                logger.info(
                    "iteration %d · %s", k, stage_line(stage, info, seconds, self.run.root), extra=CONSOLE
                )
            self.ranks.barrier()  # every rank sees the stage done before anyone reads its records
        if not self.ranks.is_main:
            return
        self.run.event("iteration_end", iteration=k)
        self.refresh_report()
        lora, scale = gate.current_champion(self.run)
        champion = f"{lora.relative_to(self.run.root)} at scale {scale:g}" if lora else "the base model"
        took = duration(time.perf_counter() - began)
        logger.info("iteration %d complete in %s; champion: %s", k, took, champion, extra=CONSOLE)

    def _event(self, kind: str, **fields) -> None:
        if self.ranks.is_main:
            self.run.event(kind, **fields)

    def _back_off(self, k: int, streak: int) -> None:
        """The LLM gave nothing usable: recorded as an iteration with zero prompts, then wait before the next."""
        if self.backoff_seconds <= 0:
            return
        wait = min(self.backoff_seconds * 2 ** (streak - 1), 3600.0)
        logger.warning("iteration %d got no usable prompt; waiting %.0f s before the next", k, wait)
        self._event("backoff", iteration=k, seconds=wait)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self.should_stop():
            self._beat(k, "backoff")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        self._stop_if_requested()

    def _beat(self, k: int, stage: str, unit: str | None = None) -> None:
        """Record where the loop is (``ccsr status`` reads it), at every unit boundary of the main process."""
        if self.ranks.is_main:
            self.run.heartbeat(iteration=k, stage=stage, unit=unit)

    def _stop_if_requested(self) -> None:
        """Stop here if a signal or the stop file asked for it (all before is committed). With several
        processes the check is collective: called at the same points on every rank, all stop together."""
        if self.ranks.any(self.should_stop()):
            raise StopRequested

    def _each_unit(self, k: int, stage: str, units: list, unit_id: Callable, work: Callable) -> None:
        """``work`` on this rank's share of ``units``, each committed by ``work`` before the next starts. A stop
        asked for on any rank ends every rank's share at its next unit, then all stop together."""
        stopped = False
        share = self.ranks.mine(units)
        for unit in bar(
            share, desc=f"iteration {k} · {stage}", unit="prompt", disable=not self.ranks.is_main
        ):
            self._beat(k, stage, unit_id(unit))
            if self.should_stop():
                stopped = True
                break
            work(unit)
        if self.ranks.any(stopped):
            raise StopRequested

    @contextmanager
    def _model_call(self, stage: str):
        """Time spent inside model code (loading and inference); the rest is orchestration overhead."""
        start = time.perf_counter()
        try:
            with keep_cpu_threads():
                yield
        finally:
            self.model_seconds[stage] = self.model_seconds.get(stage, 0.0) + time.perf_counter() - start

    def refresh_report(self) -> None:
        """The HTML report is a view of the run dir; failing to draw it must never stop the loop."""
        from ccsr.report import write_report

        try:
            logger.info("report: %s", write_report(self.run.root))
        except Exception:  # noqa: BLE001 - a broken view is logged, the work is already committed
            logger.warning("report not refreshed", exc_info=True)

    # --- checks on resume -----------------------------------------------------------------------
    def verify(self, k: int) -> None:
        """Find damaged or missing work of iteration k and make the loop redo just that.

        Candidate images are checked against their recorded checksums and redrawn from their seeds (the
        same pixels, so later records stay valid), also while the candidates stage is still under way (a
        damaged image is never handed to the judge); a LoRA that fails its checksum is retrained; a finished
        stage whose records are incomplete (a damaged line was dropped) is reopened, and its stage
        function redoes only the missing units.
        """
        done = self.run.stages_done(k)
        files = self.run.files(k)
        candidates = read_committed(files["candidates"], Candidate)  # the ranks' shards too
        bad = {
            c.prompt_id for c in candidates if c.sha256 and sha256_file(self.run.root / c.path) != c.sha256
        }
        if bad:
            logger.warning("iteration %d: %d prompts have damaged candidate images; redrawing", k, len(bad))
            self.run.event("repair", iteration=k, what="candidates", prompts=sorted(bad))
            self._redraw(k, bad)
        lora_sha = done.get("train", {}).get("lora_sha256")
        if lora_sha and sha256_file(self.run.lora_file(k)) != lora_sha:
            logger.warning("iteration %d: LoRA fails its checksum; retraining", k)
            self.run.event("repair", iteration=k, what="lora")
            shutil.rmtree(self.run.lora_dir(k), ignore_errors=True)
            self.run.unmark(k, ("train", "eval"))
        if "eval" in done and not done["eval"].get("skipped") and self.run.eval_path(k).exists():
            if read_json(self.run.eval_path(k)) is None:
                self.run.unmark(k, ("eval",))
        expected = {
            "candidates": len(read_records(files["prompts"], PromptRecord))
            * self.cfg.generator.num_candidates,
            "judge": len(candidates),
        }
        counts = {"candidates": len(candidates), "judge": len(read_records(files["judgments"], Judgment))}
        for i, stage in enumerate(STAGES):
            if stage in expected and stage in done and counts[stage] < expected[stage]:
                logger.warning("iteration %d: %s records are incomplete; redoing the missing ones", k, stage)
                self.run.event("repair", iteration=k, what=stage)
                self.run.unmark(k, STAGES[i:])
                break

    def _redraw(self, k: int, prompt_ids: set[str]) -> None:
        files = self.run.files(k)
        prompts = {p.id: p.prompt for p in read_records(files["prompts"], PromptRecord)}
        records = read_committed(
            files["candidates"], Candidate
        )  # rewritten whole: the merge counts each once
        grouped = by_prompt(records)
        generator = load_backend("generator", self.cfg)
        for pid in sorted(prompt_ids):
            group = sorted(grouped[pid], key=lambda c: c.index)
            lora = self.run.root / group[0].lora if group[0].lora else None
            images = generator.images(
                [prompts[pid]] * len(group), [c.seed for c in group], lora, group[0].scale
            )
            for c, image in zip(group, images, strict=True):
                atomic_save_image(self.run.root / c.path, image)
                if sha256_file(self.run.root / c.path) != c.sha256:
                    logger.warning("%s: redrawn image differs from the recorded one", c.path)
                    c.sha256 = sha256_file(self.run.root / c.path)
        write_records(files["candidates"], records)
        generator.close()
        free_memory()

    # --- stage 1: prompts ----------------------------------------------------------------------
    def _validation_prompts(self, prompter) -> list[PromptRecord]:
        """The held-out prompts, frozen for the whole run and never trained on (written by iteration 1)."""
        if self.run.validation_path.exists():
            return read_records(self.run.validation_path, PromptRecord)
        pc = self.cfg.prompter
        if pc.validation_file:
            lines = resolve_data_path(pc.validation_file).read_text(encoding="utf-8").splitlines()
            texts = [line.strip() for line in lines if line.strip()]
        else:
            from ccsr.prompter import collect_prompts, stream_seed

            seed = stream_seed(self.cfg, 0)  # stream 0; iteration k's prompts are stream k
            with self._model_call("prompts"):
                texts = collect_prompts(
                    prompter, self.cfg, self.cfg.class_name, pc.n_validation, [], seed
                ).prompts
        records = [PromptRecord(f"val-{i:03d}", t, self.cfg.class_name) for i, t in enumerate(texts)]
        write_records(self.run.validation_path, records)
        return records

    def stage_prompts(self, k: int) -> dict:
        """The LLM's prompts for iteration k (and the held-out ones, in iteration 1): the main process only."""
        from ccsr.prompter import collect_prompts, diversity, stream_seed

        if not self.ranks.is_main:
            return {}

        with self._model_call("prompts"):
            prompter = load_backend("prompter", self.cfg)
        validation = self._validation_prompts(prompter)
        earlier = [
            p.prompt for j in range(1, k) for p in read_records(self.run.files(j)["prompts"], PromptRecord)
        ]
        avoid = earlier + [v.prompt for v in validation]
        seed = stream_seed(self.cfg, k)
        with self._model_call("prompts"):
            batch = collect_prompts(
                prompter, self.cfg, self.cfg.class_name, self.cfg.prompter.n_prompts, avoid, seed
            )
        prompter.close()
        records = [
            PromptRecord(f"{k:03d}-{i:03d}", p, self.cfg.class_name) for i, p in enumerate(batch.prompts)
        ]
        write_records(self.run.files(k)["prompts"], records)
        div = diversity(batch.prompts)
        logger.info("iteration %d: %d prompts, dropped %s, diversity %s", k, len(records), batch.dropped, div)
        return {"count": len(records), "dropped": batch.dropped, "attempts": batch.attempts, "diversity": div}

    # --- stage 2: candidates -------------------------------------------------------------------
    def _merge(self, k: int, kind: str, cls) -> list:
        """Main process: the ranks' shards of iteration k's ``kind`` records merged in prompt, index order."""
        order = positions(p.id for p in read_records(self.run.files(k)["prompts"], PromptRecord))
        return merge_shards(
            self.run.files(k)[kind],
            cls,
            key=lambda r: (r.prompt_id, r.index),
            order=lambda r: (order.get(r.prompt_id, len(order)), r.prompt_id, r.index),
        )

    def stage_candidates(self, k: int) -> dict:
        """``num_candidates`` images per prompt with the champion before k; one prompt's images: one unit."""
        files = self.run.files(k)
        done = {c.prompt_id for c in read_committed(files["candidates"], Candidate)}
        todo = [p for p in read_records(files["prompts"], PromptRecord) if p.id not in done]
        lora = gate.champion_lora(self.run, k)
        lora_rel = str(lora.relative_to(self.run.root)) if lora else None
        scale = gate.generation_scale(self.run, k, self.cfg.generator.generation_scale)
        n = self.cfg.generator.num_candidates
        mine = self.ranks.shard_path(files["candidates"])
        generator = None

        def draw(p: PromptRecord) -> None:
            nonlocal generator
            with self._model_call("candidates"):
                generator = generator or load_backend("generator", self.cfg)
                seeds = [derive_seed(self.cfg.seed, "candidate", k, p.id, j) for j in range(n)]
                images = generator.images([p.prompt] * n, seeds, lora=lora, scale=scale)
            records = []
            for j, (seed, image) in enumerate(zip(seeds, images, strict=True)):
                path = self.run.candidates_dir(k) / f"{p.id}-{j:02d}.png"
                atomic_save_image(path, image)
                rel = str(path.relative_to(self.run.root))
                records.append(
                    Candidate(p.id, j, seed, rel, sha256_file(path), lora_rel, scale if lora else 0.0)
                )
            append_records(mine, records)

        try:
            self._each_unit(k, "candidates", todo, lambda p: p.id, draw)
        finally:
            if generator is not None:
                generator.close()
        if not self.ranks.is_main:
            return {}
        return {"count": len(self._merge(k, "candidates", Candidate)), "lora": str(lora) if lora else None}

    # --- stage 3: judge ------------------------------------------------------------------------
    def stage_judge(self, k: int) -> dict:
        """The judge's answers (dependency rule applied) and eq. 1 score per image; one prompt: one unit."""
        questions = _questions(self.cfg)
        files = self.run.files(k)
        prompts = {p.id: p.prompt for p in read_records(files["prompts"], PromptRecord)}
        done = {(j.prompt_id, j.index) for j in read_committed(files["judgments"], Judgment)}
        todo = [c for c in read_records(files["candidates"], Candidate) if (c.prompt_id, c.index) not in done]
        mine = self.ranks.shard_path(files["judgments"])
        judge: Judge | None = None

        def answer(unit: tuple[str, list[Candidate]]) -> None:
            nonlocal judge
            pid, group = unit
            images = [_open_image(self.run, c.path) for c in group]
            requests = [JudgeRequest.rendered(questions, self.cfg.class_name, prompts[pid])] * len(images)
            with self._model_call("judge"):
                judge = judge or load_backend("judge", self.cfg)
                results = in_batches(
                    lambda c: judge.answer(images[c], requests[c]),
                    len(images),
                    self.cfg.judge.batch_size,
                    "judge",
                )
            records = []
            for c, res in zip(group, results, strict=True):
                answers = questions.apply_dependencies(res.answers)
                records.append(Judgment(pid, c.index, answers, questions.score(answers), res.p_yes))
            append_records(mine, records)

        try:
            self._each_unit(k, "judge", list(by_prompt(todo).items()), lambda u: u[0], answer)
        finally:
            if judge is not None:
                judge.close()
        if not self.ranks.is_main:
            return {}
        judged = self._merge(k, "judgments", Judgment)
        return {
            "count": len(judged),
            "nan_answers": sum(a == "nan" for j in judged for a in j.answers),
            "mean_score": round(sum(j.score for j in judged) / len(judged), 4) if judged else None,
        }

    # --- stage 4: filter -----------------------------------------------------------------------
    def stage_filter(self, k: int) -> dict:
        """Detector on each prompt's best-tied images (one prompt: one unit), then the pairs (paper sec. 3)."""
        files = self.run.files(k)
        self._detect(k)
        if not self.ranks.is_main:
            return {}
        self._merge(k, "detections", Detection)
        prompts = read_records(files["prompts"], PromptRecord)
        cfg = self.cfg
        candidates = read_records(files["candidates"], Candidate)
        judgments = read_records(files["judgments"], Judgment)
        selection = select_pairs(
            prompts,
            candidates,
            read_records(files["detections"], Detection),
            cfg.filter.detection_threshold,
            cfg.filter.min_score,
            k=cfg.filter.top_k,
            judgments=judgments,
            tie_break=cfg.filter.tie_break,
            questions=_questions(cfg),
        )
        preferences = preference_pairs(selection.pairs, candidates, judgments)
        write_records(files["pairs"], selection.pairs)
        write_records(files["preferences"], preferences)
        write_dataset(self.run, k, training_pairs(cfg, self.run, k))
        write_preference_dataset(self.run, k, preferences)
        with_pair = len({p.prompt_id for p in selection.pairs})
        logger.info(
            "iteration %d: %d of %d prompts yield %d pairs", k, with_pair, len(prompts), len(selection.pairs)
        )
        result = {
            "count": len(selection.pairs),
            "prompts": len(prompts),
            "prompts_without_pair": len(prompts) - with_pair,
            "preferences": len(preferences),
        }
        if cfg.filter.min_score is not None:
            result["prompts_below_min_score"] = selection.count(BELOW_MIN_SCORE)
        return result

    def _detect(self, k: int) -> None:
        files = self.run.files(k)
        prompt_ids = [p.id for p in read_records(files["prompts"], PromptRecord)]
        paths = {(c.prompt_id, c.index): c.path for c in read_records(files["candidates"], Candidate)}
        judgments = by_prompt(read_records(files["judgments"], Judgment))
        done = {d.prompt_id for d in read_committed(files["detections"], Detection)}
        todo = [pid for pid in prompt_ids if pid in judgments and pid not in done]
        questions = _questions(self.cfg)
        mine = self.ranks.shard_path(files["detections"])
        detector = None

        def detect(pid: str) -> None:
            nonlocal detector
            # The paper's rule needs the best-tied images only; top-k ranks every candidate.
            if self.cfg.filter.top_k > 1:
                tied = judgments[pid]
            else:
                tied = best_tied(judgments[pid], self.cfg.filter.tie_break, questions)
            images = [_open_image(self.run, paths[(pid, j.index)]) for j in tied]
            with self._model_call("filter"):
                detector = detector or load_backend("detector", self.cfg)
                conf = in_batches(
                    lambda c: detector.confidence(images[c], self.cfg.class_name),
                    len(images),
                    self.cfg.detector.batch_size,
                    "detector",
                )
            records = [
                Detection(pid, j.index, j.score, round(float(c), 6)) for j, c in zip(tied, conf, strict=True)
            ]
            append_records(mine, records)

        try:
            self._each_unit(k, "filter", todo, lambda pid: pid, detect)
        finally:
            if detector is not None:
                detector.close()

    # --- stage 5: train ------------------------------------------------------------------------
    def stage_train(self, k: int) -> dict:
        """Iteration k's LoRA (``ccsr.train``), unless the iteration brought nothing to train on."""
        reason = train.nothing_to_train(self.cfg, self.run, k)
        if reason is not None:
            logger.warning("iteration %d: %s, training skipped", k, reason)
            self.run.event("train_skipped", iteration=k, reason=reason)
            return {"skipped": True, "reason": reason}
        with self._model_call("train"):
            job = train.iteration_job(self.cfg, self.run, k)
            result = train.run_job(self.cfg, job)
        return train.stage_info(self.cfg, self.run, k, job, result)

    # --- stage 6: eval -------------------------------------------------------------------------
    def stage_eval(self, k: int) -> dict:
        """Iteration k's LoRA on the held-out prompts, then the improvement gate (``ccsr.gate``)."""
        from ccsr.evaluation import evaluate

        main = self.ranks.is_main
        if not self.run.lora_file(k).is_file():
            if main:
                gate.gate_iteration(self.cfg.gate, self.run, k, None)
            return {"skipped": True, "reason": "no LoRA this iteration"}
        if not read_records(self.run.validation_path, PromptRecord):
            if main:
                gate.gate_iteration(self.cfg.gate, self.run, k, None, reason="no validation prompts")
            return {"skipped": True, "reason": "no validation prompts"}

        def on_scale(scale: float) -> None:
            self._beat(k, "eval", f"scale {scale:g}")
            self._stop_if_requested()

        with self._model_call("eval"):
            summary = evaluate(
                self.cfg, self.run, k, self.cfg.evaluator.scales, self.run.eval_dir(k), on_scale, self.ranks
            )
        if summary is None:  # not the main process: its share is merged there
            return {}
        summary["gate"] = gate.gate_iteration(self.cfg.gate, self.run, k, summary)
        atomic_write_json(self.run.eval_path(k), summary)
        logger.info(
            "iteration %d eval: win-rate %.2f at scale %g, CLIP by scale %s; gate: %s",
            k,
            summary["win_rate"],
            summary["best_scale"],
            summary["clip_score_by_scale"],
            summary["gate"]["reason"],
        )
        clip = summary["clip_score_by_scale"]
        return {
            "win_rate": summary["win_rate"],
            "best_scale": summary["best_scale"],
            "clip_score": clip.get(f"{summary['best_scale']:g}"),
            "base_clip_score": clip.get("0"),
            "gate": summary["gate"],
        }
