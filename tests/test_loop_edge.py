"""Run-time trouble that is recorded and counted, not fatal: an LLM with nothing usable, GPU out of memory."""

from __future__ import annotations

import pytest

from ccsr import backends
from ccsr.config import load_config, save_config
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
