"""The CCSR loop, stage-major: each stage loads its model once, does all its work for the iteration, frees it.

One iteration k (paper section 3):
  prompts -> candidates -> judge -> filter (best score, detector >= threshold) -> train (LoRA) -> eval.

Every stage and, inside a stage, every unit (one prompt's candidates, one prompt's judgments, one prompt's
detections) is committed before the next starts, so a restart continues where the previous process stopped.
Under a launcher every process runs this loop: the candidates, judge and filter stages share their units out
over the ranks (``Loop._sharded``), and the main process alone writes the run's records, events and heartbeat.
The rules live elsewhere: the optimal image in ``ccsr.selection``, the improvement gate in ``ccsr.gate``, the
evaluation in ``ccsr.evaluation``, the checks on resume in ``ccsr.repair``, the run directory's paths in
``ccsr.rundir`` and its records in ``ccsr.records``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from ccsr import gate, repair, train
from ccsr.backends import load_backend
from ccsr.config import Config
from ccsr.config_files import resolve_data_path
from ccsr.console import CONSOLE, duration, stage_line
from ccsr.devices import free_memory, in_batches, keep_cpu_threads
from ccsr.distributed import Ranks, StopRequested, run_sharded
from ccsr.evaluation import evaluate, open_image
from ccsr.questions import load_question_set
from ccsr.records import (
    Candidate,
    Detection,
    Judgment,
    PromptRecord,
    Record,
    read_records,
    write_dataset,
    write_preference_dataset,
    write_records,
)
from ccsr.roles import JudgeRequest
from ccsr.rundir import RunDir, atomic_save_image, atomic_write_json, sha256_file
from ccsr.seeds import derive_seed
from ccsr.selection import BELOW_MIN_SCORE, best_tied, by_prompt, preference_pairs, select_pairs
from ccsr.train import training_pairs

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=Record)


@dataclass
class Loop:
    """The iterations of one run directory; under a launcher every process runs its own ``Loop``."""

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
        """Iterations 1..``iterations``, each from where the run directory says it stopped."""
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
        """The stages of iteration k not yet done, in order; each is done once the main process marks it."""
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
                self._stage_done(k, stage, info, seconds)
            self.ranks.barrier()  # every rank sees the stage done before anyone reads its records
        if self.ranks.is_main:
            self._iteration_done(k, began)

    def _stage_done(self, k: int, stage: str, info: dict, seconds: float) -> None:
        """Main process: the stage's entry in ``stages.json`` (what makes it done), its event, its line."""
        self.run.mark_done(k, stage, seconds=round(seconds, 3), **info)
        self._event("stage_end", iteration=k, stage=stage, seconds=round(seconds, 3), **info)
        logger.info("iteration %d · %s", k, stage_line(stage, info, seconds, self.run.root), extra=CONSOLE)

    def _iteration_done(self, k: int, began: float) -> None:
        """Main process: the iteration's event, the refreshed report and the champion's line."""
        self._event("iteration_end", iteration=k)
        self.refresh_report()
        lora, scale = gate.current_champion(self.run)
        champion = f"{lora.relative_to(self.run.root)} at scale {scale:g}" if lora else "the base model"
        took = duration(time.perf_counter() - began)
        logger.info("iteration %d complete in %s; champion: %s", k, took, champion, extra=CONSOLE)

    def _event(self, kind: str, **fields) -> None:
        """The one way the loop writes ``events.jsonl``: the main process's events only."""
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

    def load(self, role: str) -> Any:
        """The backend of ``role`` as the config names it (``<role>.backend``). Every model of the loop and of
        its evaluation is built here, so a subclass can time the loading (``gpu_check.MeasuredLoop``)."""
        return load_backend(role, self.cfg)

    def _sharded(self, k: int, stage: str, role: str, kind: str, cls: type[R], todo, work) -> list[R] | None:
        """Stage ``stage`` of iteration k through the data-parallel protocol (``distributed.run_sharded``):
        its units' records of ``kind`` (``run.files(k)[kind]``, records ``cls``), the model of ``role``."""

        def before_unit(prompt_id: str) -> bool:
            self._beat(k, stage, prompt_id)
            return self.should_stop()

        prompt_order = [p.id for p in read_records(self.run.files(k)["prompts"], PromptRecord)]
        path = self.run.files(k)[kind]
        load = partial(self.load, role)
        desc = f"iteration {k} · {stage}"
        return run_sharded(self.ranks, path, cls, todo, work, load, prompt_order, before_unit, desc)

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

    def verify(self, k: int) -> None:
        """On resume (main process, before any stage): iteration k's damaged or missing work made to be redone
        (``ccsr.repair``)."""
        repair.verify(self.cfg, self.run, k, self.load)

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
            prompter = self.load("prompter")
        validation = self._validation_prompts(prompter)
        earlier = [
            p.prompt for j in range(1, k) for p in read_records(self.run.files(j)["prompts"], PromptRecord)
        ]
        seed, held_out = stream_seed(self.cfg, k), [v.prompt for v in validation]
        with self._model_call("prompts"):
            n = self.cfg.prompter.n_prompts
            batch = collect_prompts(prompter, self.cfg, self.cfg.class_name, n, earlier, seed, held_out)
        prompter.close()
        records = [
            PromptRecord(f"{k:03d}-{i:03d}", p, self.cfg.class_name) for i, p in enumerate(batch.prompts)
        ]
        write_records(self.run.files(k)["prompts"], records)
        div = diversity(batch.prompts)
        logger.info("iteration %d: %d prompts, dropped %s, diversity %s", k, len(records), batch.dropped, div)
        return {"count": len(records), "dropped": batch.dropped, "attempts": batch.attempts, "diversity": div}

    # --- stage 2: candidates -------------------------------------------------------------------
    def stage_candidates(self, k: int) -> dict:
        """``num_candidates`` images per prompt with the champion before k; one prompt's images: one unit."""
        prompts = read_records(self.run.files(k)["prompts"], PromptRecord)
        lora = gate.champion_lora(self.run, k)
        lora_rel = str(lora.relative_to(self.run.root)) if lora else None
        scale = gate.generation_scale(self.run, k, self.cfg.generator.generation_scale)
        n = self.cfg.generator.num_candidates

        def undrawn(drawn: list[Candidate]) -> dict[str, PromptRecord]:
            done = {c.prompt_id for c in drawn}
            return {p.id: p for p in prompts if p.id not in done}

        def draw(generator: Callable[[], Any], pid: str, p: PromptRecord) -> list[Candidate]:
            seeds = [derive_seed(self.cfg.seed, "candidate", k, pid, j) for j in range(n)]
            with self._model_call("candidates"):
                images = generator().images([p.prompt] * n, seeds, lora=lora, scale=scale)
            records = []
            for j, (seed, image) in enumerate(zip(seeds, images, strict=True)):
                path = self.run.candidates_dir(k) / f"{pid}-{j:02d}.png"
                self.run.inside(path)  # a prompt id is data: it names a file inside the run only
                atomic_save_image(path, image)
                rel = str(path.relative_to(self.run.root))
                records.append(
                    Candidate(pid, j, seed, rel, sha256_file(path), lora_rel, scale if lora else 0.0)
                )
            return records

        drawn = self._sharded(k, "candidates", "generator", "candidates", Candidate, undrawn, draw)
        if drawn is None:  # not the main process: its shard is merged there
            return {}
        return {"count": len(drawn), "lora": str(lora) if lora else None}

    # --- stage 3: judge ------------------------------------------------------------------------
    def stage_judge(self, k: int) -> dict:
        """The judge's answers (dependency rule applied) and eq. 1 score per image; one prompt: one unit."""
        questions = load_question_set(self.cfg.judge.questions)
        files = self.run.files(k)
        prompts = {p.id: p.prompt for p in read_records(files["prompts"], PromptRecord)}

        def unjudged(judged: list[Judgment]) -> dict[str, list[Candidate]]:
            # Image by image: a unit cut short by a crash leaves only its missing images to judge.
            done = {(j.prompt_id, j.index) for j in judged}
            candidates = read_records(files["candidates"], Candidate)
            return by_prompt(c for c in candidates if (c.prompt_id, c.index) not in done)

        def answer(judge: Callable[[], Any], pid: str, group: list[Candidate]) -> list[Judgment]:
            images = [open_image(self.run, c.path) for c in group]
            requests = [JudgeRequest.rendered(questions, self.cfg.class_name, prompts[pid])] * len(images)
            with self._model_call("judge"):
                results = in_batches(
                    lambda c: judge().answer(images[c], requests[c]),
                    len(images),
                    self.cfg.judge.batch_size,
                    "judge",
                )
            answers = [questions.apply_dependencies(res.answers) for res in results]
            return [
                Judgment(pid, c.index, a, questions.score(a), res.p_yes)
                for c, a, res in zip(group, answers, results, strict=True)
            ]

        judged = self._sharded(k, "judge", "judge", "judgments", Judgment, unjudged, answer)
        if judged is None:  # not the main process: its shard is merged there
            return {}
        return {
            "count": len(judged),
            "nan_answers": sum(a == "nan" for j in judged for a in j.answers),
            "mean_score": round(sum(j.score for j in judged) / len(judged), 4) if judged else None,
        }

    # --- stage 4: filter -----------------------------------------------------------------------
    def stage_filter(self, k: int) -> dict:
        """The detector on the images each prompt chooses among, then the pairs (paper sec. 3)."""
        if self._detect(k) is None:  # not the main process: its shard is merged there
            return {}
        return self._select_pairs(k)

    def _detect(self, k: int) -> list[Detection] | None:
        """The detector's confidence in the class on each prompt's best-tied images (every judged image with
        ``top_k`` > 1); one prompt: one unit (``_sharded``)."""
        files = self.run.files(k)
        prompt_ids = [p.id for p in read_records(files["prompts"], PromptRecord)]
        paths = {(c.prompt_id, c.index): c.path for c in read_records(files["candidates"], Candidate)}
        judgments = by_prompt(read_records(files["judgments"], Judgment))
        questions = load_question_set(self.cfg.judge.questions)

        def undetected(detected: list[Detection]) -> dict[str, list[Judgment]]:
            done = {d.prompt_id for d in detected}
            return {pid: judgments[pid] for pid in prompt_ids if pid in judgments and pid not in done}

        def detect(detector: Callable[[], Any], pid: str, judged: list[Judgment]) -> list[Detection]:
            # The paper's rule needs the best-tied images only; top-k ranks every candidate.
            if self.cfg.filter.top_k > 1:
                tied = judged
            else:
                tied = best_tied(judged, self.cfg.filter.tie_break, questions)
            images = [open_image(self.run, paths[(pid, j.index)]) for j in tied]
            with self._model_call("filter"):
                conf = in_batches(
                    lambda c: detector().confidence(images[c], self.cfg.class_name),
                    len(images),
                    self.cfg.detector.batch_size,
                    "detector",
                )
            return [
                Detection(pid, j.index, j.score, round(float(c), 6)) for j, c in zip(tied, conf, strict=True)
            ]

        return self._sharded(k, "filter", "detector", "detections", Detection, undetected, detect)

    def _select_pairs(self, k: int) -> dict:
        """Main process: iteration k's training pairs (``ccsr.selection``: the optimal image of each prompt,
        or its top k) and preference pairs, written as records and as the two image-folder datasets
        (``dataset/`` of the pairs of every iteration trained on, ``preference_dataset/``)."""
        files = self.run.files(k)
        cfg = self.cfg
        prompts = read_records(files["prompts"], PromptRecord)
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
            questions=load_question_set(cfg.judge.questions),
        )
        preferences = preference_pairs(selection.pairs, candidates, judgments)
        write_records(files["pairs"], selection.pairs)
        write_records(files["preferences"], preferences)
        write_dataset(self.run, k, training_pairs(cfg, self.run, k))
        write_preference_dataset(self.run, k, preferences)
        with_pair = len({p.prompt_id for p in selection.pairs})
        result = {
            "count": len(selection.pairs),
            "prompts": len(prompts),
            "prompts_without_pair": len(prompts) - with_pair,
            "preferences": len(preferences),
        }
        if cfg.filter.min_score is not None:
            result["prompts_below_min_score"] = selection.count(BELOW_MIN_SCORE)
        return result

    # --- stage 5: train ------------------------------------------------------------------------
    def stage_train(self, k: int) -> dict:
        """Iteration k's LoRA (``ccsr.train``), unless the iteration brought nothing to train on."""
        reason = train.nothing_to_train(self.cfg, self.run, k)
        if reason is not None:
            logger.warning("iteration %d: %s, training skipped", k, reason)
            self._event("train_skipped", iteration=k, reason=reason)
            return {"skipped": True, "reason": reason}
        with self._model_call("train"):
            job = train.iteration_job(self.cfg, self.run, k)
            # The stage's unit is one optimizer step: a stop request is honoured after the step in flight.
            result = train.run_job(self.cfg, job, should_stop=lambda: self.ranks.any(self.should_stop()))
        return train.stage_info(self.cfg, self.run, k, job, result)

    # --- stage 6: eval -------------------------------------------------------------------------
    def stage_eval(self, k: int) -> dict:
        """Iteration k's LoRA on the held-out prompts, then the improvement gate (``ccsr.gate``)."""
        if not self.run.lora_file(k).is_file():
            return self._eval_skipped(k, "no LoRA this iteration")
        if not read_records(self.run.validation_path, PromptRecord):
            return self._eval_skipped(k, "no validation prompts")

        def on_scale(scale: float) -> None:
            self._beat(k, "eval", f"scale {scale:g}")
            self._stop_if_requested()

        scales, out = self.cfg.evaluator.scales, self.run.eval_dir(k)
        with self._model_call("eval"):
            summary = evaluate(self.cfg, self.run, k, scales, out, on_scale, self.ranks, load=self.load)
        if summary is None:  # not the main process: its share is merged there
            return {}
        images = gate.paired_images(self.cfg, self.run, k)
        summary["gate"] = gate.gate_iteration(self.cfg.gate, self.run, k, summary, images=images)
        atomic_write_json(self.run.eval_path(k), summary)
        clip, best = summary["clip_score_by_scale"], summary["best_scale"]
        figures = {"win_rate": summary["win_rate"], "best_scale": best, "clip_score": clip.get(f"{best:g}")}
        return figures | {"base_clip_score": clip.get("0"), "gate": summary["gate"]}

    def _eval_skipped(self, k: int, reason: str) -> dict:
        """Nothing to evaluate: the gate records iteration k as rejected (main process), the stage as skipped."""
        if self.ranks.is_main:
            gate.gate_iteration(self.cfg.gate, self.run, k, None, reason=reason)
        return {"skipped": True, "reason": reason}
