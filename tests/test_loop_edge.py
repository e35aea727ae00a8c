"""Run-time trouble that is recorded and counted, not fatal: an LLM with nothing usable, GPU out of memory."""

from __future__ import annotations

import pytest

from ccsr import backends
from ccsr.config_files import load_config, save_config
from ccsr.loop import Loop
from ccsr.rundir import RunDir, read_json, read_jsonl


class SilentPrompter:
    """Stands in for the LLM only to test the loop's bookkeeping when no usable prompt comes back."""

    calls = 0

    def __init__(self, cfg):
        pass

    def sample(self, messages, num, seed):
        SilentPrompter.calls += 1
        return ["", "ok", "??"][:num]

    def close(self):
        pass


def test_no_usable_prompt_records_an_empty_iteration_and_goes_on(tmp_path, repo_root, monkeypatch):
    monkeypatch.setitem(backends.BACKENDS["prompter"], "silent", "tests.test_loop_edge:SilentPrompter")
    monkeypatch.syspath_prepend(str(repo_root))
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["prompter.max_attempts=3"], class_name="giraffe")
    cfg.prompter.backend = "silent"
    run = RunDir(tmp_path / "giraffe")
    run.root.mkdir()
    save_config(cfg, run.config_path)
    loop = Loop(cfg, run, backoff_seconds=0.01)
    loop.run_iterations(2)
    for k in (1, 2):
        done = run.stages_done(k)
        assert done["prompts"]["count"] == 0
        assert done["prompts"]["dropped"]["unparsable"] > 0
        assert done["train"]["skipped"] and done["eval"]["skipped"]
        assert read_jsonl(run.files(k)["pairs"]) == []
    assert SilentPrompter.calls == 3 * 3  # validation + two iterations, each within its retry budget
    events = [e["event"] for e in read_jsonl(run.events_path)]
    assert events.count("backoff") == 2
    history = read_json(run.root / "champion.json")["history"]
    assert [h["accepted"] for h in history] == [False, False]


def test_in_batches_keeps_order_and_halves_on_out_of_memory():
    """Every stage's batching: slices of the configured size in order, half the size after a CUDA
    out-of-memory error, the error itself once a single item does not fit."""
    import torch

    from ccsr.devices import in_batches

    items = list(range(11))
    sizes = []

    def call(c):
        sizes.append(c.stop - c.start)
        if c.stop - c.start > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return [x * 10 for x in items[c]]

    assert in_batches(call, len(items), 8, "test") == [x * 10 for x in items]
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 1]
    assert in_batches(lambda c: items[c], 0, 4, "test") == []
    with pytest.raises(RuntimeError, match="1 results for 2 inputs"):
        in_batches(lambda c: items[c][:1], 4, 2, "test")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        in_batches(lambda c: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")), 3, 2, "test")


def test_eval_scores_the_same_in_any_batch_size(repo_root):
    """The evaluation's CLIP scorer, judge and detector on the tiny models, one image per call against one
    call for all: the same scores."""
    from ccsr.devices import in_batches
    from ccsr.evaluation import CLIPScorer, judge_and_detect
    from ccsr.generator import DiffusersGenerator
    from ccsr.records import EvalRecord

    sets = ["generator.steps=2", "generator.resolution=64", "detector.image_size=64"]
    prompts = ["a giraffe", "a giraffe at dusk", "two giraffes", "a giraffe calf", "a tall giraffe"]
    cfg = load_config(repo_root / "configs" / "tiny.yaml", sets, class_name="giraffe")
    images = DiffusersGenerator(cfg).images(prompts, [1, 2, 3, 4, 5])

    def scored(batch: int):
        sizes = [f"{role}.batch_size={batch}" for role in ("judge", "detector", "evaluator")]
        c = load_config(repo_root / "configs" / "tiny.yaml", sets + sizes, class_name="giraffe")
        records = [EvalRecord(f"v{i}", p, 0, i, 0.0, "x.png") for i, p in enumerate(prompts)]
        judge_and_detect(c, [records], [images])  # one unit of all five
        scorer = CLIPScorer(c)
        clip = in_batches(lambda s: scorer.clip_scores(images[s], prompts[s]), 5, batch, "CLIP score")
        return [r.judge_score for r in records], [r.confidence for r in records], clip

    (judge_one, conf_one, clip_one), (judge_many, conf_many, clip_many) = scored(1), scored(64)
    assert judge_one == judge_many
    # Float reductions differ with the batch's shape: the same to a millionth.
    assert conf_one == pytest.approx(conf_many, abs=1e-5) and any(c > 0 for c in conf_one)
    assert clip_one == pytest.approx(clip_many, abs=1e-4)


def test_generator_halves_its_batch_on_out_of_memory(repo_root, monkeypatch):
    import torch

    from ccsr.generator import DiffusersGenerator

    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["generator.steps=2", "generator.batch_size=8"])
    gen = DiffusersGenerator(cfg)
    real_draw = gen._draw
    sizes = []

    def draw(prompts, seeds):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_draw(prompts, seeds)

    monkeypatch.setattr(gen, "_draw", draw)
    images = gen.images(["a giraffe"] * 5, [1, 2, 3, 4, 5])
    assert len(images) == 5
    assert sizes == [5, 4, 2, 2, 1]

    monkeypatch.setattr(gen, "_draw", lambda p, s: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gen.images(["a giraffe"], [1])


def test_a_damaged_candidate_image_is_redrawn_on_resume_while_its_stage_is_under_way(tmp_path, repo_root):
    """A candidate PNG replaced by a non-image after its prompt's unit was committed, the stage not finished:
    the resume check finds it by its checksum and redraws it from its seed, so the judge never opens it."""
    from ccsr.distributed import StopRequested
    from ccsr.records import Candidate, PromptRecord, read_records, write_records

    sets = ["generator.steps=2", "generator.num_candidates=2"]
    cfg = load_config(repo_root / "configs" / "tiny.yaml", sets, class_name="giraffe")
    run = RunDir(tmp_path / "giraffe")
    run.root.mkdir()
    save_config(cfg, run.config_path)
    files = run.files(1)
    run.iteration_dir(1).mkdir(parents=True)
    prompts = [
        PromptRecord("001-000", "a giraffe", "giraffe"),
        PromptRecord("001-001", "two giraffes", "giraffe"),
    ]
    write_records(files["prompts"], prompts)
    stops = iter([False, True])  # stop at the second unit boundary: the first prompt's images are committed
    with pytest.raises(StopRequested):
        Loop(cfg, run, should_stop=lambda: next(stops)).stage_candidates(1)
    drawn = read_records(files["candidates"], Candidate)
    assert [c.prompt_id for c in drawn] == ["001-000", "001-000"] and "candidates" not in run.stages_done(1)
    image = run.root / drawn[1].path
    good = image.read_bytes()
    image.write_bytes(b"not a png\n")

    Loop(cfg, run).verify(1)
    assert image.read_bytes() == good  # the same seed draws the same pixels
    repairs = [e for e in read_jsonl(run.events_path) if e["event"] == "repair"]
    assert [(r["what"], r["prompts"]) for r in repairs] == [("candidates", ["001-000"])]
    assert read_records(files["candidates"], Candidate) == drawn
