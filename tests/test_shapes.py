"""The shapes world: renderer ground truth, the measuring judge and detector, and a shortened proof run."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from ccsr.config_files import load_config, resolve_data_path
from ccsr.prompter import collect_prompts
from ccsr.questions import QuestionSet
from ccsr.roles import JudgeRequest
from experiments.shapes import world
from experiments.shapes.backends import (
    GrammarPrompter,
    MeasuringDetector,
    MeasuringJudge,
    NoisyJudge,
    RandomJudge,
)


def _cfg(class_name: str = "triangle", *overrides: str):
    return load_config("configs/shapes.yaml", list(overrides), class_name=class_name)


def _renders(shape: str, n: int, seed: int = 0):
    rng = random.Random(seed)
    specs = world.all_specs(shape)
    for _ in range(n):
        spec = rng.choice(specs)
        scene = world.random_scene(spec, rng)
        yield scene, world.render(spec, scene.objects)


@pytest.mark.parametrize("shape", world.CLASSES)
def test_measurement_matches_ground_truth_on_renders(shape):
    for scene, image in _renders(shape, 40):
        m = world.measure(image)
        assert m.background == scene.spec.background
        assert len(m.of_shape(shape)) == scene.spec.count, scene.caption
        assert all(o.colour == scene.spec.colour for o in m.objects)
        assert world.accuracy(scene.spec, m).exact
        assert world.parse_caption(scene.caption) == scene.spec


def test_captions_parse_in_every_template_and_held_out_split():
    for shape in world.CLASSES:
        held, train = world.validation_specs(shape), world.training_specs(shape)
        assert held and train and not set(held) & set(train)
        assert len(held) + len(train) == len(world.all_specs(shape))
        # every count, colour and background still appears in training: only combinations are new
        for attr, values in (
            ("count", world.COUNTS),
            ("colour", world.COLOURS),
            ("background", world.BACKGROUNDS),
        ):
            assert {getattr(s, attr) for s in train} == set(values)
        for spec in held[:3]:
            for t in range(len(world.TEMPLATES)):
                assert world.parse_caption(world.caption(spec, t)) == spec
    assert world.parse_caption("a photo of a giraffe") is None


@pytest.mark.parametrize("shape", world.CLASSES)
def test_judge_scores_perfect_renders_maximal(shape):
    cfg = _cfg(shape)
    questions = QuestionSet.load(resolve_data_path(cfg.judge.questions))
    best = questions.score(["yes" if q.polarity == "positive" else "no" for q in questions.questions])
    judge = MeasuringJudge(cfg)
    scenes = list(_renders(shape, 12, seed=1))
    requests = [JudgeRequest.rendered(questions, shape, s.caption) for s, _ in scenes]
    answers = judge.answer([img for _, img in scenes], requests)
    for (scene, _), a in zip(scenes, answers, strict=True):
        assert questions.score(a.answers) == best == 10, (scene.caption, a.answers)


def test_judge_catches_wrong_count_colour_and_background():
    cfg = _cfg("square")
    questions = QuestionSet.load(resolve_data_path(cfg.judge.questions))
    judge = MeasuringJudge(cfg)
    rng = random.Random(3)
    spec = world.SceneSpec("square", 2, "red", "white")
    image = world.render(spec, world.place_objects(spec, rng))
    ids = questions.ids
    prompts = {
        "count": "one red square on a white background",
        "colour": "two blue squares on a white background",
        "background": "two red squares on a black background",
    }
    wrong_answer = {"count": "Q4", "colour": "Q5", "background": "Q8"}
    for what, prompt in prompts.items():
        (a,) = judge.answer([image], [JudgeRequest.rendered(questions, "square", prompt)])
        assert a.answers[ids.index(wrong_answer[what])] == "no", what
        assert a.answers[ids.index("Q10")] == "no"
        assert questions.score(a.answers) < 10
    # Asked about another class: Q3 is 'no', Q4-Q7 become 'nan' by the dependency rule; Q6 sees other shapes.
    request = JudgeRequest.rendered(questions, "circle", "two red circles on a white background")
    (a,) = judge.answer([image], [request])
    resolved = questions.apply_dependencies(a.answers)
    assert resolved[ids.index("Q3")] == "no" and resolved[ids.index("Q4")] == "nan"


def test_detector_confident_on_class_not_on_blank_or_other_class():
    detector = MeasuringDetector(_cfg("star"))
    threshold = _cfg("star").filter.detection_threshold
    for shape in world.CLASSES:
        images = [img for _, img in _renders(shape, 10, seed=5)]
        conf = detector.confidence(images, shape)
        assert min(conf) >= threshold, (shape, conf)
        others = [c for c in world.CLASSES if c != shape]
        assert max(max(detector.confidence(images, o)) for o in others) < threshold
    blank = [Image.new("RGB", (64, 64), rgb) for rgb in world.BACKGROUNDS.values()]
    assert detector.confidence(blank, "circle") == [0.0, 0.0, 0.0]


def test_grammar_prompter_and_random_judge():
    cfg = _cfg("circle")
    batch = collect_prompts(GrammarPrompter(cfg), cfg, "circle", 15, [], seed=7)
    assert len(batch.prompts) == 15
    for p in batch.prompts:
        spec = world.parse_caption(p)
        assert spec is not None and spec.shape == "circle" and not world.is_held_out(spec), p
    # the same seed gives the same prompts
    assert collect_prompts(GrammarPrompter(cfg), cfg, "circle", 15, [], seed=7).prompts == batch.prompts
    # sample i is drawn with seed + i, as vLLM draws it: a call's seeds are its own block
    grammar = GrammarPrompter(cfg)
    two = grammar.sample([], num=2, seed=7)
    assert two[1] == grammar.sample([], num=1, seed=8)[0] and two[0] != two[1]
    questions = QuestionSet.load(resolve_data_path(cfg.judge.questions))
    _, image = next(_renders("circle", 1))
    requests = [JudgeRequest.rendered(questions, "circle", batch.prompts[0])]
    first = RandomJudge(cfg).answer([image], requests)[0].answers
    assert first == RandomJudge(cfg).answer([image], requests)[0].answers
    with pytest.raises(ValueError, match="shapes world draws"):
        GrammarPrompter(_cfg("giraffe"))


def test_noisy_judge_flips_answers_at_its_rate_and_repeats_itself():
    images = [img for _, img in _renders("circle", 60, seed=9)]
    cfg = _cfg("circle")
    questions = QuestionSet.load(resolve_data_path(cfg.judge.questions))
    requests = [JudgeRequest.rendered(questions, "circle", "one red circle on a white background")] * len(
        images
    )
    exact = [a.answers for a in MeasuringJudge(cfg).answer(images, requests)]
    assert [
        a.answers
        for a in NoisyJudge(_cfg("circle", "judge.model=shapes-measurement")).answer(images, requests)
    ] == exact
    noisy = NoisyJudge(_cfg("circle", "judge.model=shapes-measurement+flip=0.25"))
    answers = [a.answers for a in noisy.answer(images, requests)]
    flipped = sum(x != y for a, b in zip(answers, exact, strict=True) for x, y in zip(a, b, strict=True))
    assert 0.18 < flipped / (60 * len(questions)) < 0.32, flipped
    assert answers == [a.answers for a in noisy.answer(images, requests)]  # seeded: a resume answers alike
    for bad in (
        "shapes-measurement+flip=0.7",
        "shapes-measurement+noise=0.1",
        "llava",
        "shapes-measurement+flip=x",
    ):
        with pytest.raises(ValueError, match="judge.model of the shapes judge"):
            NoisyJudge(_cfg("circle", f"judge.model={bad}"))


def test_base_data_mis_captions_only_the_weak_binding():
    from experiments.shapes.base_model import BaseModelConfig, render_dataset

    cfg = BaseModelConfig(weak_binding_shown=0.25, count_label_noise=0.0)
    _, captions, truths = render_dataset(4000, 0, cfg)
    asked = [(world.parse_caption(c), t) for c, t in zip(captions, truths, strict=True)]
    weak = [t for spec, t in asked if (spec.shape, spec.colour) == ("circle", "purple")]
    shown = sum(t.colour == "purple" for t in weak) / len(weak)
    assert 0.15 < shown < 0.35, shown  # 25% of ~170 scenes
    assert all(t.shape == "circle" and t.colour != "purple" for t in weak if t.colour != "purple")
    # every other caption shows what it says (count noise is off here)
    assert all(spec == t for spec, t in asked if (spec.shape, spec.colour) != ("circle", "purple"))
    with pytest.raises(ValueError, match="class:colour"):
        render_dataset(2, 0, BaseModelConfig(weak_binding="circle:pink"))


def test_base_data_keeps_the_rare_binding_rare_in_captions_and_pixels():
    from experiments.shapes.base_model import BaseModelConfig, render_dataset

    cfg = BaseModelConfig(rare_binding="circle:green", rare_binding_kept=0.05, count_label_noise=0.0)
    _, captions, truths = render_dataset(6000, 0, cfg)
    specs = [world.parse_caption(c) for c in captions]
    green_circles = sum((s.shape, s.colour) == ("circle", "green") for s in specs)
    red_circles = sum((s.shape, s.colour) == ("circle", "red") for s in specs)
    assert red_circles > 250 and green_circles < red_circles / 8, (green_circles, red_circles)
    # the mis-captioned purple circles never show the rare colour: it stays rare in the pixels as well
    shown = sum((t.shape, t.colour) == ("circle", "green") for t in truths)
    assert shown == green_circles
    # the rare binding is still captioned right when it is drawn
    assert all(
        t == s for s, t in zip(specs, truths, strict=True) if (s.shape, s.colour) == ("circle", "green")
    )
    with pytest.raises(ValueError, match="rare_binding"):
        render_dataset(2, 0, BaseModelConfig(rare_binding="disc:green"))


def test_tokenizer_has_one_token_per_grammar_word():
    from experiments.shapes.base_model import build_tokenizer, vocabulary

    tok = build_tokenizer()
    for word in vocabulary():
        assert len(tok.tokenize(word)) == 1, word
    assert len(tok("two red triangles on a gray background").input_ids) == 7 + 2  # words, BOS, EOS


@pytest.fixture(scope="session")
def quick_base_model(tmp_path_factory):
    """A base model of the real architecture trained for a few steps (noise, but loadable and trainable)."""
    from experiments.shapes.base_model import BaseModelConfig, train_base_model

    out = tmp_path_factory.mktemp("shapes-base")
    train_base_model(
        out, BaseModelConfig(images=64, vae_steps=3, unet_steps=3, vae_batch_size=4, unet_batch_size=4)
    )
    return out


def test_shortened_proof_runs_every_stage(quick_base_model, tmp_path):
    from experiments.shapes import proof

    work, out = tmp_path / "proof", tmp_path / "docs"
    out.mkdir()
    hand_written = b"# the protocol and the reading, by hand\n"
    (out / "proof.md").write_bytes(hand_written)
    # Threshold 0: an untrained base draws no recognisable shape, and every stage must still run.
    argv = ["--quick", "--base-model", str(quick_base_model), "--work-dir", str(work), "--out-dir", str(out)]
    assert proof.main([*argv, "--set", "filter.detection_threshold=0"]) == 0
    it = work / "ccsr" / "iterations" / "001"
    stages = json.loads((it / "stages.json").read_text())
    assert {"prompts", "candidates", "judge", "filter", "train", "eval"} <= set(stages), stages
    assert (it / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # threshold 0: every prompt yields its filter.top_k best candidates
    top_k = load_config("configs/shapes.yaml").filter.top_k
    assert len((it / "pairs.jsonl").read_text().splitlines()) == 3 * top_k

    results = json.loads((out / "proof.json").read_text())
    prompts = proof.PROTOCOL.target_prompts()
    n_images = len(prompts) * proof.QUICK_SEEDS
    assert len(prompts) == 3 and all("purple circle" in p for p in prompts)
    assert results["primary_metric"] == proof.PROTOCOL.primary_metric and results["minutes"] > 0
    assert results["protocol"]["target_prompts"] == prompts and results["protocol"]["seed_set"] == "final"
    assert results["base"]["images"] == n_images
    assert set(results["variants"]) == set(proof.QUICK_VARIANTS)
    for name, v in results["variants"].items():
        for m in [v["final"], *v["secondary"].values()]:
            assert set(m) >= {"value", "delta_vs_base", "ci95", "images"}, name
            assert m["value"] == pytest.approx(m["base_value"] + m["delta_vs_base"], abs=0.011), name
            assert m["ci95"][0] <= m["delta_vs_base"] <= m["ci95"][1], name
        images = 3 * 1 if name == "best-of-10" else n_images  # best-of-10: one seed group per prompt
        assert v["final"]["images"] == images, name
        assert len(list((work / "final" / name).glob("*.png"))) == images, name
        if name != "best-of-10":
            assert v["final"]["base_value"] == results["base"]["value"], name
    assert results["variants"]["base"]["final"]["delta_vs_base"] == 0
    # ground-truth trained as many steps as the ccsr run's LoRA took
    assert results["variants"]["ground-truth"]["ground_truth"]["steps"] == stages["train"]["steps"]
    assert (work / "ground-truth" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    renders = sorted((work / "ground-truth" / "images").glob("*.png"))
    assert len(renders) == 3 * top_k  # the ccsr run's 3 prompts, filter.top_k renders each
    for path in renders:
        prompt_id = path.stem.rsplit("-", 1)[0]
        (record,) = [
            r
            for r in map(json.loads, (it / "prompts.jsonl").read_text().splitlines())
            if r["id"] == prompt_id
        ]
        spec = world.parse_caption(record["prompt"])
        assert world.accuracy(spec, world.measure(Image.open(path))).exact, path
    assert "iterations" in results["variants"]["ccsr"]["loop"]

    text = (out / "proof-results.md").read_text()
    assert "do not edit by hand" in text and "| ground-truth |" in text and "## Selection" in text
    grid = Image.open(out / "proof-grid.png")
    side = world.SIZE * proof.GRID_SCALE
    rows = len(prompts) * (proof.GRID_STRIP + 3 * side)  # base, ccsr, ground-truth
    assert grid.size == (proof.GRID_LABEL_WIDTH + proof.QUICK_SEEDS * side, proof.GRID_STRIP + rows)
    assert (out / "proof.md").read_bytes() == hand_written


def test_paired_comparison_with_the_base():
    import numpy as np

    from experiments.shapes.measure_final import bootstrap_ci, compare

    rng = np.random.default_rng(1)
    keys = [(f"prompt {p}", s) for p in range(3) for s in range(40)]
    base = {
        k: dict.fromkeys(("colour", "count", "exact", "any_shape_colour"), bool(rng.random() < 0.3))
        for k in keys
    }
    # the model gets 12 of the base's wrong images right and 2 of its right ones wrong
    wrong = [k for k in keys if not base[k]["colour"]]
    right = [k for k in keys if base[k]["colour"]]
    model = {k: dict(v) for k, v in base.items()}
    for k in wrong[:12]:
        model[k]["colour"] = True
    for k in right[:2]:
        model[k]["colour"] = False
    # pairing is by (prompt, seed), whatever the order of the rows
    m = compare(dict(reversed(list(model.items()))), base)["final"]
    assert m["images"] == 120 and m["delta_vs_base"] == round(100 * 10 / 120, 2)
    assert m["value"] == pytest.approx(m["base_value"] + m["delta_vs_base"], abs=0.011)
    assert 0 < m["ci95"][0] < m["delta_vs_base"] < m["ci95"][1]
    diffs = np.array([100.0 * (model[k]["colour"] - base[k]["colour"]) for k in sorted(keys)])
    assert m["ci95"] == [round(x, 2) for x in bootstrap_ci(diffs)]  # numpy seed 0: the same every time
    same = compare(base, base)["secondary"]["count"]
    assert same["value"] == same["base_value"] and same["delta_vs_base"] == 0 and same["ci95"] == [0.0, 0.0]


def test_best_of_n_picks_what_the_judge_and_detector_prefer():
    from experiments.shapes.measure_final import Picker

    pick = Picker(_cfg("circle"))
    rng = random.Random(2)
    prompt = "one purple circle on a white background"
    right = world.SceneSpec("circle", 1, "purple", "white")
    wrong = [world.SceneSpec("circle", 1, "red", "white"), world.SceneSpec("circle", 2, "purple", "white")]
    images = [world.render(s, world.place_objects(s, rng)) for s in [*wrong, right, wrong[0]]]
    assert pick(prompt, images) == 2
    blank = [Image.new("RGB", (64, 64), world.BACKGROUNDS["white"])] * 3
    assert pick(prompt, blank) is None  # nothing passes the detector: the caller keeps the base's image


def test_dev_run_uses_the_dev_seeds_and_loop_seed_1(monkeypatch, tmp_path):
    import ccsr.cli
    from experiments.shapes import proof
    from experiments.shapes.measure_final import EXTRA_SEED_BASE

    p = proof.PROTOCOL
    evaluator = set(load_config("configs/shapes.yaml").evaluator.seeds)
    assert not set(p.final_seeds) & set(p.dev_seeds) and not evaluator & (
        set(p.final_seeds) | set(p.dev_seeds)
    )
    assert EXTRA_SEED_BASE > max(p.final_seeds[-1], p.dev_seeds[-1])
    calls = []
    monkeypatch.setattr(ccsr.cli, "main", lambda argv: calls.append(argv) or 0)
    for dev in (False, True):
        s = proof.Settings(dev=dev, work_dir=tmp_path, base_model="m")
        assert s.seeds == (p.dev_seeds if dev else p.final_seeds)
        proof.run_loop(s, "no-gate")
    reported, dev_run = calls
    assert "seed=1" in dev_run and not any(a.startswith("seed=") for a in reported)
    assert "gate.enabled=false" in reported and "generator.model=m" in reported


def test_ground_truth_needs_the_ccsr_variant(capsys):
    from experiments.shapes.proof import main

    with pytest.raises(SystemExit):
        main(["--variants", "base", "ground-truth"])
    assert "add ccsr" in capsys.readouterr().err


def test_base_model_saves_v_prediction_zero_terminal_snr(quick_base_model):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(quick_base_model, subfolder="scheduler")
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.rescale_betas_zero_snr and sched.config.timestep_spacing == "trailing"
    # Zero terminal SNR: the last timestep holds no signal at all (SD's own schedule keeps 6.8% of it).
    assert float(sched.alphas_cumprod[-1]) < 1e-6


def test_base_model_ends_with_the_ema_of_its_training_weights():
    import torch

    from experiments.shapes import base_model as bm

    cfg = bm.BaseModelConfig(images=8, unet_steps=4, unet_batch_size=2, ema_decay=0.2)
    tokenizer = bm.build_tokenizer()
    text_encoder, _, unet = bm.build_parts(tokenizer, cfg.seed)
    means, stds = torch.randn(8, 4, 16, 16), torch.full((8, 4, 16, 16), 0.1)
    captions = ["two red squares on a white background"] * 8
    weight = unet.conv_in.weight
    live = []

    def on_step(step, ema):
        live.append(weight.detach().clone())

    bm.train_unet(unet, text_encoder, tokenizer, means, stds, captions, 1.0, cfg, on_step=on_step)
    assert len(live) == 4 and not torch.equal(live[-1], live[-2])
    # diffusers' EMAModel: the first step copies the weights, then decay (1 + s) / (10 + s) capped at ema_decay
    expected = live[0]
    for s, w in enumerate(live[1:], start=1):
        d = min(cfg.ema_decay, (1 + s) / (10 + s))
        expected = d * expected + (1 - d) * w
    assert torch.allclose(weight, expected, atol=1e-6)
    assert not torch.allclose(weight, live[-1])


def test_cached_base_model_trains_once_into_its_versioned_folder(tmp_path, monkeypatch):
    from experiments.shapes import base_model as bm

    calls = []

    def train(out, cfg):  # bookkeeping only: the training itself is exercised by quick_base_model
        calls.append(cfg)
        out.mkdir(parents=True)
        (out / "model_index.json").write_text("{}")

    monkeypatch.setattr(bm, "train_base_model", train)
    first = bm.cached_base_model(tmp_path)
    assert first == tmp_path / f"shapes-sd-v{bm.VERSION}" and (first / "model_index.json").is_file()
    assert bm.cached_base_model(tmp_path) == first and calls == [bm.BaseModelConfig()]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    # configs/shapes.yaml names the same folder, under the Makefile's cache, for a run by hand
    assert load_config("configs/shapes.yaml").generator.model == f".cache/ccsr-tiny/{first.name}"

    def broken(out, cfg):
        out.mkdir(parents=True)
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(bm, "train_base_model", broken)
    with pytest.raises(RuntimeError, match="killed"):
        bm.cached_base_model(tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == [tmp_path / "other" / f".{first.name}.lock"]


def test_shapes_config_validation_prompts_fit_every_class():
    cfg = load_config("configs/shapes.yaml")
    for shape in world.CLASSES:
        captions = world.validation_captions(shape, cfg.prompter.n_validation)
        assert len(set(captions)) == cfg.prompter.n_validation


def test_min_score_keeps_only_prompts_whose_best_image_reaches_it(quick_base_model, tmp_path):
    from ccsr.cli import main as ccsr_main
    from ccsr.rundir import read_jsonl
    from experiments.shapes.proof import QUICK

    run_dir = tmp_path / "run"
    sets = [*QUICK, "prompter.n_prompts=6", "filter.detection_threshold=0", "filter.min_score=2"]
    sets += [f"generator.model={quick_base_model}"]
    argv = ["run", "--config", "configs/shapes.yaml", "--class", "square", "--run-dir", str(run_dir)]
    argv += ["--iterations", "1"] + [x for s in sets for x in ("--set", s)]
    assert ccsr_main(argv) == 0
    it = run_dir / "iterations" / "001"
    best: dict[str, int] = {}
    for r in read_jsonl(it / "judgments.jsonl"):
        best[r["prompt_id"]] = max(best.get(r["prompt_id"], -99), r["score"])
    assert len(best) == 6
    kept = {p["prompt_id"] for p in read_jsonl(it / "pairs.jsonl")}
    assert kept == {pid for pid, s in best.items() if s >= 2}
    assert 0 < len(kept) < 6  # both sides of the cut are exercised
    assert all(p["score"] >= 2 for p in read_jsonl(it / "pairs.jsonl"))
    filt = json.loads((it / "stages.json").read_text())["filter"]
    assert filt["prompts_below_min_score"] == sum(s < 2 for s in best.values())


def test_base_model_training_gives_the_thread_count_back(tmp_path):
    import torch

    from experiments.shapes.base_model import BaseModelConfig, train_base_model

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cfg = BaseModelConfig(
            images=8, vae_steps=1, unet_steps=1, vae_batch_size=4, unet_batch_size=4, threads=2
        )
        train_base_model(tmp_path / "m", cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_proof_schedule_starts_loops_first_and_dependants_last():
    from experiments.shapes import proof

    order = proof.schedule(list(proof.DEFAULT_VARIANTS))
    assert sorted(order) == sorted(proof.DEFAULT_VARIANTS)
    loops = [n for n in order if proof.VARIANTS[n][1] == "loop"]
    assert order[: len(loops)] == loops and loops[-1] == "paper"
    for name, needed in proof.NEEDS.items():
        assert order.index(needed) < order.index(name)
