"""The CCSR loop, stage-major: each stage loads its model once, does all its work for the iteration, frees it.

One iteration k (DESIGN.md, paper section 3):
  prompts -> candidates -> judge -> filter (best score, detector >= threshold) -> train (LoRA) -> eval.

Every stage and, inside a stage, every unit (one prompt's candidates, one prompt's judgments, one prompt's
detections) is committed before the next starts, so a restart continues where the previous process stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ccsr.backends import load_backend
from ccsr.config import Config, resolve_data_path
from ccsr.devices import free_memory, keep_cpu_threads
from ccsr.rundir import (
    STAGES,
    RunDir,
    append_jsonl,
    atomic_save_image,
    atomic_write_json,
    read_jsonl,
    sha256_file,
    write_jsonl,
)

logger = logging.getLogger(__name__)


class StopRequested(Exception):
    """Raised at a unit boundary when a stop was asked for (signal or stop file)."""


def derive_seed(base: int, *parts: Any) -> int:
    """A stable 31-bit seed for one purpose, so every random draw of a run follows from ``cfg.seed``."""
    text = ":".join(str(p) for p in (base, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


@dataclass
class Loop:
    cfg: Config
    run: RunDir
    should_stop: Callable[[], bool] = lambda: False
    # The daemon waits this long (doubling, at most an hour) after an iteration that got no usable prompt.
    backoff_seconds: float = 0.0
    model_seconds: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return self.cfg.class_name

    def _check_stop(self, k: int | None = None, stage: str | None = None, unit: str | None = None) -> None:
        """Called between units: records a heartbeat, then stops if asked to."""
        self.run.heartbeat(iteration=k, stage=stage, unit=unit)
        if self.should_stop():
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

    # --- the loop ------------------------------------------------------------------------------
    def run_iterations(self, iterations: int) -> None:
        self.run.clean_temp()
        for k in self.run.iterations():
            self.verify(k)
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

    def _back_off(self, k: int, streak: int) -> None:
        """The LLM gave nothing usable: recorded as an iteration with zero prompts, then wait before the next."""
        if self.backoff_seconds <= 0:
            return
        wait = min(self.backoff_seconds * 2 ** (streak - 1), 3600.0)
        logger.warning("iteration %d got no usable prompt; waiting %.0f s before the next", k, wait)
        self.run.event("backoff", iteration=k, seconds=wait)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self._check_stop(k, "backoff")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def run_iteration(self, k: int) -> None:
        self.run.iteration_dir(k).mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            if self.run.is_done(k, stage):
                continue
            self._check_stop(k, stage)
            logger.info("iteration %d: %s", k, stage)
            self.run.event("stage_start", iteration=k, stage=stage)
            self.model_seconds[stage] = 0.0
            start = time.perf_counter()
            info = getattr(self, f"stage_{stage}")(k) or {}
            seconds = time.perf_counter() - start
            free_memory()
            self.stage_seconds[stage] = seconds
            self.run.mark_done(k, stage, seconds=round(seconds, 3), **info)
            self.run.event("stage_end", iteration=k, stage=stage, seconds=round(seconds, 3), **info)
        self.run.event("iteration_end", iteration=k)
        self.refresh_report()
        logger.info("iteration %d complete", k)

    def refresh_report(self) -> None:
        """The HTML report is a view of the run dir; failing to draw it must never stop the loop."""
        from ccsr.report import write_report

        try:
            path = write_report(self.run.root)
            logger.info("report: %s", path)
        except Exception as exc:  # noqa: BLE001 - a broken view is logged, the work is already committed
            logger.warning("report not refreshed: %s", exc)

    # --- checks on resume -----------------------------------------------------------------------
    def verify(self, k: int) -> None:
        """Find damaged or missing work of iteration k and make the loop redo just that.

        Candidate images are checked against their recorded checksums and redrawn from their seeds (the
        same pixels, so later records stay valid); a LoRA that fails its checksum is retrained; a finished
        stage whose records are incomplete (a damaged line was dropped) is reopened, and its stage
        function redoes only the missing units.
        """
        done = self.run.stages_done(k)
        files = self.run.files(k)
        if "candidates" in done:
            bad = {
                c["prompt_id"]
                for c in read_jsonl(files["candidates"])
                if c.get("sha256") and sha256_file(self.run.root / c["path"]) != c["sha256"]
            }
            if bad:
                logger.warning(
                    "iteration %d: %d prompts have damaged candidate images; redrawing", k, len(bad)
                )
                self.run.event("repair", iteration=k, what="candidates", prompts=sorted(bad))
                self._redraw(k, bad)
        lora_sha = done.get("train", {}).get("lora_sha256")
        if lora_sha and sha256_file(self.run.lora_dir(k) / "pytorch_lora_weights.safetensors") != lora_sha:
            logger.warning("iteration %d: LoRA fails its checksum; retraining", k)
            self.run.event("repair", iteration=k, what="lora")
            shutil.rmtree(self.run.lora_dir(k), ignore_errors=True)
            self.run.unmark(k, ("train", "eval"))
        if "eval" in done and not done["eval"].get("skipped") and self.run.eval_path(k).exists():
            from ccsr.rundir import read_json

            if read_json(self.run.eval_path(k)) is None:
                self.run.unmark(k, ("eval",))
        n_prompts = len(read_jsonl(files["prompts"]))
        expected = {
            "candidates": n_prompts * self.cfg.generator.num_candidates,
            "judge": len(read_jsonl(files["candidates"])),
        }
        counts = {
            "candidates": len(read_jsonl(files["candidates"])),
            "judge": len(read_jsonl(files["judgments"])),
        }
        for i, stage in enumerate(STAGES):
            if stage in expected and stage in done and counts[stage] < expected[stage]:
                logger.warning("iteration %d: %s records are incomplete; redoing the missing ones", k, stage)
                self.run.event("repair", iteration=k, what=stage)
                self.run.unmark(k, STAGES[i:])
                break

    def _redraw(self, k: int, prompt_ids: set[str]) -> None:
        files = self.run.files(k)
        prompts = {p["id"]: p["prompt"] for p in read_jsonl(files["prompts"])}
        records = read_jsonl(files["candidates"])
        generator = load_backend("generator", self.cfg)
        for pid in sorted(prompt_ids):
            group = sorted((c for c in records if c["prompt_id"] == pid), key=lambda c: c["index"])
            lora = self.run.root / group[0]["lora"] if group[0].get("lora") else None
            images = generator.images(
                [prompts[pid]] * len(group), [c["seed"] for c in group], lora, group[0]["scale"]
            )
            for c, image in zip(group, images, strict=True):
                atomic_save_image(self.run.root / c["path"], image)
                if sha256_file(self.run.root / c["path"]) != c["sha256"]:
                    logger.warning("%s: redrawn image differs from the recorded one", c["path"])
                    c["sha256"] = sha256_file(self.run.root / c["path"])
        write_jsonl(files["candidates"], records)
        generator.close()
        free_memory()

    # --- helpers -------------------------------------------------------------------------------
    def champion(self, before: int) -> dict:
        """The champion when iteration ``before`` starts: the newest LoRA the gate accepted, or the base."""
        from ccsr.rundir import read_json

        history = (read_json(self.run.root / "champion.json", default={}) or {}).get("history", [])
        accepted = [h for h in history if h["accepted"] and h["iteration"] < before]
        if not accepted:
            return {"iteration": None, "lora": None, "scale": 0.0, "metric": None}
        top = accepted[-1]
        return {
            "iteration": top["iteration"],
            "lora": self.run.lora_dir(top["iteration"]),
            "scale": top["scale"],
            "metric": top["metric"],
        }

    def previous_lora(self, k: int) -> Path | None:
        """LoRA used for iteration k's candidates and as its training start: the champion before k."""
        return self.champion(before=k)["lora"]

    def all_earlier_prompts(self, k: int) -> list[str]:
        out = []
        for j in range(1, k):
            out += [r["prompt"] for r in read_jsonl(self.run.files(j)["prompts"])]
        return out

    # --- stage 1: prompts ----------------------------------------------------------------------
    def _validation_prompts(self, prompter) -> list[dict]:
        path = self.run.validation_path
        if path.exists():
            return read_jsonl(path)
        pc = self.cfg.prompter
        if pc.validation_file:
            lines = resolve_data_path(pc.validation_file).read_text(encoding="utf-8").splitlines()
            texts = [line.strip() for line in lines if line.strip()]
        else:
            from ccsr.prompter import collect_prompts

            with self._model_call("prompts"):
                batch = collect_prompts(
                    prompter,
                    self.cfg,
                    self.class_name,
                    pc.n_validation,
                    [],
                    derive_seed(self.cfg.seed, "val"),
                )
            texts = batch.prompts
        records = [{"id": f"val-{i:03d}", "class": self.class_name, "prompt": t} for i, t in enumerate(texts)]
        write_jsonl(path, records)  # frozen for the whole run, never trained on
        return records

    def stage_prompts(self, k: int) -> dict:
        from ccsr.prompter import collect_prompts, diversity

        with self._model_call("prompts"):
            prompter = load_backend("prompter", self.cfg)
        validation = self._validation_prompts(prompter)
        avoid = self.all_earlier_prompts(k) + [r["prompt"] for r in validation]
        with self._model_call("prompts"):
            batch = collect_prompts(
                prompter,
                self.cfg,
                self.class_name,
                self.cfg.prompter.n_prompts,
                avoid,
                derive_seed(self.cfg.seed, "prompts", k),
            )
        prompter.close()
        records = [
            {"id": f"{k:03d}-{i:03d}", "class": self.class_name, "prompt": p}
            for i, p in enumerate(batch.prompts)
        ]
        write_jsonl(self.run.files(k)["prompts"], records)
        div = diversity(batch.prompts)
        logger.info("iteration %d: %d prompts, dropped %s, diversity %s", k, len(records), batch.dropped, div)
        return {"count": len(records), "dropped": batch.dropped, "attempts": batch.attempts, "diversity": div}

    # --- stage 2: candidates -------------------------------------------------------------------
    def stage_candidates(self, k: int) -> dict:
        files = self.run.files(k)
        prompts = read_jsonl(files["prompts"])
        done = {r["prompt_id"] for r in read_jsonl(files["candidates"])}
        todo = [p for p in prompts if p["id"] not in done]
        lora = self.previous_lora(k)
        scale = self.cfg.generator.generation_scale
        n = self.cfg.generator.num_candidates
        out_dir = self.run.iteration_dir(k) / "candidates"
        if todo:
            with self._model_call("candidates"):
                generator = load_backend("generator", self.cfg)
            for p in tqdm(todo, desc=f"iter {k} candidates", unit="prompt"):
                self._check_stop(k, "candidates", p["id"])
                seeds = [derive_seed(self.cfg.seed, "candidate", k, p["id"], j) for j in range(n)]
                with self._model_call("candidates"):
                    images = generator.images([p["prompt"]] * n, seeds, lora=lora, scale=scale)
                records = []
                for j, (seed, image) in enumerate(zip(seeds, images, strict=True)):
                    path = out_dir / f"{p['id']}-{j:02d}.png"
                    atomic_save_image(path, image)
                    records.append(
                        {
                            "prompt_id": p["id"],
                            "index": j,
                            "seed": seed,
                            "path": str(path.relative_to(self.run.root)),
                            "sha256": sha256_file(path),
                            "lora": str(lora.relative_to(self.run.root)) if lora else None,
                            "scale": scale if lora else 0.0,
                        }
                    )
                append_jsonl(files["candidates"], records)  # one prompt's candidates: one commit
            generator.close()
        return {"count": len(read_jsonl(files["candidates"])), "lora": str(lora) if lora else None}

    # --- stage 3: judge ------------------------------------------------------------------------
    def stage_judge(self, k: int) -> dict:
        from PIL import Image

        from ccsr.questions import QuestionSet

        questions = QuestionSet.load(resolve_data_path(self.cfg.judge.questions))
        files = self.run.files(k)
        prompts = {p["id"]: p["prompt"] for p in read_jsonl(files["prompts"])}
        cands = read_jsonl(files["candidates"])
        done = {(r["prompt_id"], r["index"]) for r in read_jsonl(files["judgments"])}
        by_prompt: dict[str, list[dict]] = {}
        for c in cands:
            if (c["prompt_id"], c["index"]) not in done:
                by_prompt.setdefault(c["prompt_id"], []).append(c)
        if by_prompt:
            with self._model_call("judge"):
                judge = load_backend("judge", self.cfg)
            for pid, group in tqdm(by_prompt.items(), desc=f"iter {k} judge", unit="prompt"):
                self._check_stop(k, "judge", pid)
                images = [Image.open(self.run.root / c["path"]).convert("RGB") for c in group]
                rendered = questions.render(self.class_name, prompts[pid])
                with self._model_call("judge"):
                    results = judge.answer(images, [rendered] * len(images))
                records = []
                for c, res in zip(group, results, strict=True):
                    answers = questions.apply_dependencies(res.answers)
                    records.append(
                        {
                            "prompt_id": pid,
                            "index": c["index"],
                            "answers": answers,
                            "score": questions.score(answers),
                            "p_yes": res.p_yes,
                        }
                    )
                append_jsonl(files["judgments"], records)
            judge.close()
        judged = read_jsonl(files["judgments"])
        nan = sum(a == "nan" for r in judged for a in r["answers"])
        return {"count": len(judged), "nan_answers": nan}

    # --- stage 4: filter -----------------------------------------------------------------------
    def _best_tied(self, judgments: list[dict], questions) -> list[dict]:
        """Images tied at the best score of their prompt (paper), optionally narrowed by signed P(yes)."""
        best = max(r["score"] for r in judgments)
        tied = [r for r in judgments if r["score"] == best]
        if self.cfg.judge.tie_break == "p_yes" and len(tied) > 1:
            from ccsr.questions import signed_p_yes

            keyed = [(signed_p_yes(questions, r["p_yes"], r["answers"]), r) for r in tied]
            top = max(v for v, _ in keyed)
            tied = [r for v, r in keyed if v == top]
        return tied

    def stage_filter(self, k: int) -> dict:
        from PIL import Image

        from ccsr.questions import QuestionSet

        questions = QuestionSet.load(resolve_data_path(self.cfg.judge.questions))
        files = self.run.files(k)
        prompts = {p["id"]: p["prompt"] for p in read_jsonl(files["prompts"])}
        paths = {(c["prompt_id"], c["index"]): c["path"] for c in read_jsonl(files["candidates"])}
        judgments: dict[str, list[dict]] = {}
        for r in read_jsonl(files["judgments"]):
            judgments.setdefault(r["prompt_id"], []).append(r)
        done = {r["prompt_id"] for r in read_jsonl(files["detections"])}
        todo = [pid for pid in prompts if pid in judgments and pid not in done]
        if todo:
            with self._model_call("filter"):
                detector = load_backend("detector", self.cfg)
            for pid in tqdm(todo, desc=f"iter {k} detect", unit="prompt"):
                self._check_stop(k, "filter", pid)
                tied = self._best_tied(judgments[pid], questions)
                images = [Image.open(self.run.root / paths[(pid, r["index"])]).convert("RGB") for r in tied]
                with self._model_call("filter"):
                    conf = detector.confidence(images, self.class_name)
                records = [
                    {
                        "prompt_id": pid,
                        "index": r["index"],
                        "score": r["score"],
                        "confidence": round(float(c), 6),
                    }
                    for r, c in zip(tied, conf, strict=True)
                ]
                append_jsonl(files["detections"], records)
            detector.close()

        threshold = self.cfg.detector.threshold
        detections: dict[str, list[dict]] = {}
        for r in read_jsonl(files["detections"]):
            detections.setdefault(r["prompt_id"], []).append(r)
        min_score = self.cfg.judge.min_score
        pairs = []
        below_min_score = 0
        for pid, prompt in prompts.items():
            passing = [d for d in detections.get(pid, []) if d["confidence"] >= threshold]
            if min_score is not None and passing and passing[0]["score"] < min_score:
                below_min_score += 1  # the best image is not good enough: no pair, counted
                continue
            if not passing:
                continue  # no confident detection: this prompt yields no pair (recorded, not an error)
            top = max(passing, key=lambda d: (d["confidence"], -d["index"]))
            pairs.append(
                {
                    "prompt_id": pid,
                    "index": top["index"],
                    "prompt": prompt,
                    "path": paths[(pid, top["index"])],
                    "score": top["score"],
                    "confidence": top["confidence"],
                }
            )
        write_jsonl(files["pairs"], pairs)
        self._write_dataset(k)
        logger.info("iteration %d: %d of %d prompts yield a pair", k, len(pairs), len(prompts))
        result = {"count": len(pairs), "prompts_without_pair": len(prompts) - len(pairs)}
        if min_score is not None:
            result["prompts_below_min_score"] = below_min_score
        return result

    def training_pairs(self, k: int) -> list[dict]:
        if self.cfg.trainer.train_on == "newest":
            return read_jsonl(self.run.files(k)["pairs"])
        return [p for j in range(1, k + 1) for p in read_jsonl(self.run.files(j)["pairs"])]

    def _write_dataset(self, k: int) -> None:
        """The training set as an image folder with metadata.jsonl (diffusers scripts, datasets' imagefolder)."""
        final = self.run.files(k)["dataset"]
        tmp = final.with_name(f".dataset.tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        meta = []
        for p in self.training_pairs(k):
            name = f"{p['prompt_id']}.png"
            src = self.run.root / p["path"]
            try:
                os.link(src, tmp / name)
            except OSError:
                shutil.copyfile(src, tmp / name)
            meta.append({"file_name": name, "text": p["prompt"]})
        write_jsonl(tmp / "metadata.jsonl", meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    # --- stage 5: train ------------------------------------------------------------------------
    def stage_train(self, k: int) -> dict:
        from ccsr.trainer import TrainPair, train_lora

        pairs = self.training_pairs(k)
        if not read_jsonl(self.run.files(k)["pairs"]):
            # Nothing new to learn from: retraining on earlier pairs alone would only repeat an iteration.
            logger.warning("iteration %d: no new pairs, training skipped", k)
            self.run.event("train_skipped", iteration=k, reason="no new pairs")
            return {"skipped": True, "reason": "no new pairs"}
        init = self.previous_lora(k) if self.cfg.trainer.init_from == "previous" else None
        train_pairs = [
            TrainPair(prompt=p["prompt"], image_path=self.run.root / p["path"], score=float(p["score"]))
            for p in pairs
        ]
        with self._model_call("train"):
            result = train_lora(
                self.cfg,
                train_pairs,
                self.run.lora_dir(k),
                init_lora=init,
                encode_cache_dir=self.run.encode_cache,
                prior_dir=self.run.root / "cache" / "prior",  # base-model class images, drawn once per run
            )
        return {
            "pairs": len(pairs),
            "lora_sha256": sha256_file(self.run.lora_dir(k) / "pytorch_lora_weights.safetensors"),
            "steps": result.steps,
            "final_loss": result.final_loss,
            "init_lora": str(init) if init else None,
        }

    # --- stage 6: eval -------------------------------------------------------------------------
    def stage_eval(self, k: int) -> dict:
        lora = self.run.lora_dir(k)
        if not (lora / "pytorch_lora_weights.safetensors").is_file():
            self._gate(k, None)
            return {"skipped": True, "reason": "no LoRA this iteration"}
        if not read_jsonl(self.run.validation_path):
            self._gate(k, None, reason="no validation prompts")
            return {"skipped": True, "reason": "no validation prompts"}
        summary = self.evaluate(k, self.cfg.evaluator.scales, self.run.iteration_dir(k) / "eval")
        summary["gate"] = self._gate(k, summary)
        atomic_write_json(self.run.eval_path(k), summary)
        logger.info(
            "iteration %d eval: win-rate %.2f at scale %g, CLIP by scale %s; gate: %s",
            k,
            summary["win_rate"],
            summary["best_scale"],
            summary["clip_score_by_scale"],
            summary["gate"]["reason"],
        )
        return {"win_rate": summary["win_rate"], "best_scale": summary["best_scale"], "gate": summary["gate"]}

    def evaluate(self, k: int, scales: list[float], eval_dir: Path) -> dict:
        """Held-out prompts x fixed seeds at each LoRA scale of iteration k's LoRA; scale 0 is the base model.

        Writes the images and ``records.jsonl`` under ``eval_dir`` and returns the summary (no gate decision).
        """
        from ccsr.evaluator import CLIPScorer, summarise

        lora = self.run.lora_dir(k)
        ec = self.cfg.evaluator
        scales = sorted({0.0, *map(float, scales)})  # win/tie/loss needs the base
        validation = read_jsonl(self.run.validation_path)
        jobs = [(v, seed) for v in validation for seed in ec.seeds]
        prompts = [v["prompt"] for v, _ in jobs]
        # The same seeds at every scale, so scale 0 is exactly the base model's image.
        seeds = [derive_seed(self.cfg.seed, "eval", v["id"], s) for v, s in jobs]
        records = []
        with self._model_call("eval"):
            generator = load_backend("generator", self.cfg)  # loaded once; the LoRA once; scales switched
            for scale in tqdm(scales, desc=f"iter {k} eval", unit="scale"):
                self._check_stop(k, "eval", f"scale {scale:g}")
                images = generator.images(prompts, seeds, lora=lora, scale=scale)
                for (v, s), seed, image in zip(jobs, seeds, images, strict=True):
                    path = eval_dir / f"scale-{scale:g}" / f"{v['id']}-s{s}.png"
                    atomic_save_image(path, image)
                    records.append(
                        {
                            "prompt_id": v["id"],
                            "prompt": v["prompt"],
                            "seed": s,
                            "generator_seed": seed,
                            "scale": scale,
                            "path": str(path.relative_to(self.run.root)),
                        }
                    )
            generator.close()
            del generator
            free_memory()
            images = [self._open(r["path"]) for r in records]
            scorer = CLIPScorer(self.cfg)
            for r, score in zip(
                records, scorer.clip_scores(images, [r["prompt"] for r in records]), strict=True
            ):
                r["clip_score"] = score
            scorer.close()
            if ec.judge_and_detect:
                self._judge_and_detect(records, images)
        write_jsonl(eval_dir / "records.jsonl", records)
        summary = summarise(records, scales, ec.tie_band)
        summary["lora"] = str(lora.relative_to(self.run.root))
        return summary

    def _open(self, rel_path: str):
        from PIL import Image

        return Image.open(self.run.root / rel_path).convert("RGB")

    def _judge_and_detect(self, records: list[dict], images: list) -> None:
        """CLIP score alone is a weak judge of alignment; add the loop's own judge score and detection rate."""
        from ccsr.questions import QuestionSet

        questions = QuestionSet.load(resolve_data_path(self.cfg.judge.questions))
        judge = load_backend("judge", self.cfg)
        for start in range(0, len(records), self.cfg.judge.batch_size):
            chunk = slice(start, start + self.cfg.judge.batch_size)
            rendered = [questions.render(self.class_name, r["prompt"]) for r in records[chunk]]
            for r, res in zip(records[chunk], judge.answer(images[chunk], rendered), strict=True):
                r["judge_score"] = questions.score(questions.apply_dependencies(res.answers))
        judge.close()
        del judge
        free_memory()
        detector = load_backend("detector", self.cfg)
        confidences = detector.confidence(images, self.class_name)
        for r, c in zip(records, confidences, strict=True):
            r["confidence"] = round(float(c), 6)
            r["detected"] = bool(c >= self.cfg.detector.threshold)
        detector.close()

    # --- the improvement gate ------------------------------------------------------------------
    def _gate(self, k: int, summary: dict | None, reason: str = "no LoRA this iteration") -> dict:
        """Accept iteration k's LoRA as the new champion only if it beats the current one by the margin.

        The base model's win-rate against itself is 0 (every pair a tie); for the other metrics the base's
        value is read at scale 0 of the same evaluation.
        """
        from ccsr.rundir import read_json

        gc = self.cfg.gate
        path = self.run.root / "champion.json"
        state = read_json(path, default={}) or {}
        history = [h for h in state.get("history", []) if h["iteration"] != k]  # idempotent on a redo
        champ = self.champion(before=k)
        entry = {"iteration": k, "accepted": False, "metric_name": gc.metric, "metric": None, "scale": None}
        if summary is None:
            entry["reason"] = reason
        else:
            by_scale = summary["by_scale"]
            scored = {float(s): v.get(gc.metric) for s, v in by_scale.items() if float(s) > 0}
            scored = {s: v for s, v in scored.items() if v is not None} or {summary["best_scale"]: 0.0}
            best = max(scored, key=lambda s: (scored[s], -s))
            entry["metric"], entry["scale"] = scored[best], best
            if champ["iteration"] is None:
                reference = 0.0 if gc.metric == "win_rate" else by_scale["0"].get(gc.metric, 0.0)
            else:
                reference = champ["metric"]
            entry["champion_metric"] = reference
            if not gc.enabled:
                entry["accepted"], entry["reason"] = True, "gate disabled"
            elif scored[best] > reference + gc.margin:
                entry["accepted"] = True
                entry["reason"] = f"{gc.metric} {scored[best]:.4f} > {reference:.4f} + margin {gc.margin:g}"
            else:
                entry["reason"] = f"{gc.metric} {scored[best]:.4f} <= {reference:.4f} + margin {gc.margin:g}"
        history.append(entry)
        history.sort(key=lambda h: h["iteration"])
        accepted = [h for h in history if h["accepted"]]
        champion = (
            {
                "iteration": accepted[-1]["iteration"],
                "scale": accepted[-1]["scale"],
                "metric": accepted[-1]["metric"],
            }
            if accepted
            else {"iteration": None, "scale": 0.0, "metric": None}
        )
        if champion["iteration"] is not None:
            champion["lora"] = str(self.run.lora_dir(champion["iteration"]).relative_to(self.run.root))
        atomic_write_json(path, {"champion": champion, "history": history})
        self.run.event("gate", **entry)
        return {k2: entry[k2] for k2 in ("accepted", "reason", "metric", "scale")}
