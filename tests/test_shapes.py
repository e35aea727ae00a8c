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
    import gzip

    from experiments.shapes import evaluator, proof
    from experiments.shapes.protocol import PROTOCOL, QUICK_VARIANTS

    work, out = tmp_path / "proof", tmp_path / "docs"
    out.mkdir()
    hand_written = b"# the protocol and the reading, by hand\n"
    (out / "proof.md").write_bytes(hand_written)
    # Threshold 0: an untrained base draws no recognisable shape, and every stage must still run.
    argv = ["--quick", "--base-model", str(quick_base_model), "--work-dir", str(work), "--out-dir", str(out)]
    assert proof.main([*argv, "--set", "filter.detection_threshold=0"]) == 0
    seed = PROTOCOL.loop_seeds[0]
    it = work / "runs" / f"ccsr@{seed}" / "iterations" / "001"
    stages = json.loads((it / "stages.json").read_text())
    assert {"prompts", "candidates", "judge", "filter", "train", "eval"} <= set(stages), stages
    assert (it / "lora" / "pytorch_lora_weights.safetensors").is_file()
    top_k = load_config("configs/shapes.yaml").filter.top_k
    assert len((it / "pairs.jsonl").read_text().splitlines()) == 3 * top_k  # threshold 0: top_k per prompt
    # the gate never sees a target prompt, and the loop never trains on a gate prompt
    gate = (work / "gate-prompts-circle.txt").read_text().splitlines()
    assert gate == PROTOCOL.gate_prompts() and not set(gate) & set(PROTOCOL.target_prompts())
    trained = [json.loads(line)["prompt"] for line in (it / "prompts.jsonl").read_text().splitlines()]
    assert not set(trained) & set(gate)

    # the matched control: the same prompts, as many pairs per prompt as ccsr's preference pairs
    control = work / "runs" / f"control@{seed}" / "iterations" / "001"
    assert (control / "prompts.jsonl").read_text() == (it / "prompts.jsonl").read_text()

    def per_prompt(path):
        counts = {}
        for line in path.read_text().splitlines():
            pid = json.loads(line)["prompt_id"]
            counts[pid] = counts.get(pid, 0) + 1
        return counts

    assert per_prompt(control / "preferences.jsonl") == per_prompt(it / "preferences.jsonl")
    assert json.loads((control / "stages.json").read_text())["filter"]["short"] == 0
    assert (control / "lora" / "pytorch_lora_weights.safetensors").is_file()

    results = json.loads((out / "proof.json").read_text())
    targets = PROTOCOL.target_prompts()
    assert len(targets) == 24 and results["target_prompts"] == targets
    n_target = len(targets) * proof.QUICK_SEEDS
    assert results["primary_metric"] == PROTOCOL.primary_metric and results["minutes"] > 0
    assert results["protocol"]["seed_set"] == "final" and results["loop_seeds"] == [seed]
    assert results["base"]["images"] == n_target
    assert set(results["variants"]) == set(QUICK_VARIANTS)
    for name, v in results["variants"].items():
        for m in [v["exact"], v["colour"], v["count"], *v["by_weakness"]["purple"].values()]:
            assert set(m) >= {"value", "delta_vs_base", "ci95", "images"}, name
            assert m["value"] == pytest.approx(m["base_value"] + m["delta_vs_base"], abs=0.011), name
            assert m["ci95"][0] <= m["delta_vs_base"] + 1e-9 and m["delta_vs_base"] <= m["ci95"][1] + 1e-9, (
                name
            )
        assert v["exact"]["images"] == (len(targets) if name == "best-of-10" else n_target), name
    assert results["variants"]["base"]["exact"]["delta_vs_base"] == 0
    assert set(results["variants"]["ccsr"]["per_loop_seed"]) == {str(seed)}
    assert set(results["non_inferiority"]) == {
        "count, target prompts",
        "exact, circle, other colours",
        "exact, other classes, weak colours",
    }
    assert results["control_delta"]["loop_seeds"] == [seed]
    assert 0 <= results["judge"]["on_base_images"]["accuracy"] <= 100
    # every final model's per-image rows, from which the numbers are recomputed
    rows = [json.loads(x) for x in gzip.open(out / "proof-rows" / f"ccsr@{seed}.jsonl.gz", "rt")]
    guards = sum(len(g) for g in PROTOCOL.guard_prompts().values())
    assert len(rows) == n_target + guards  # guard prompts at one seed in --quick
    exact = 100 * sum(r["exact"] for r in rows if r["prompt"] in targets) / n_target
    assert exact == pytest.approx(results["variants"]["ccsr"]["exact"]["value"], abs=0.01)
    # ground-truth trained as many steps as the ccsr run's LoRA took
    assert (
        results["variants"]["ground-truth"]["runs"]["ground-truth"]["ground_truth"]["steps"]
        == stages["train"]["steps"]
    )
    renders = sorted((work / "ground-truth" / "images").glob("*.png"))
    assert len(renders) == 3 * top_k
    for path in renders:
        prompt_id = path.stem.rsplit("-", 1)[0]
        (record,) = [
            r
            for r in map(json.loads, (it / "prompts.jsonl").read_text().splitlines())
            if r["id"] == prompt_id
        ]
        assert evaluator.grade_image(record["prompt"], Image.open(path).convert("RGB"))["exact"], path

    text = (out / "proof-results.md").read_text()
    assert "do not edit by hand" in text and "| ground-truth |" in text and "matched control" in text
    assert Image.open(out / "proof-grid.png").size[1] > 0
    assert (out / "proof.md").read_bytes() == hand_written


def test_hierarchical_bootstrap_pairs_images_and_widens_for_prompt_clusters():
    import numpy as np

    from experiments.shapes import stats

    rng = np.random.default_rng(1)
    keys = [(f"prompt {p}", s) for p in range(6) for s in range(40)]
    base = {k: {"exact": bool(rng.random() < 0.3)} for k in keys}
    # the model gets 24 of the base's wrong images right and 4 of its right ones wrong, spread over prompts
    wrong = [k for k in keys if not base[k]["exact"]]
    right = [k for k in keys if base[k]["exact"]]
    wrong = [wrong[i] for i in rng.permutation(len(wrong))]
    model = {k: dict(v) for k, v in base.items()}
    for k in wrong[:24]:
        model[k]["exact"] = True
    for k in right[:4]:
        model[k]["exact"] = False
    m = stats.versus([dict(reversed(list(model.items())))], base, "exact")  # pairing by key, any order
    assert m["images"] == 240 and m["delta"] == round(100 * 20 / 240, 2) and m["runs"] == 1
    assert m["value"] == pytest.approx(m["reference_value"] + m["delta"], abs=0.011)
    assert 0 < m["ci95"][0] < m["delta"] < m["ci95"][1]
    assert stats.versus([model], base, "exact")["ci95"] == m["ci95"]  # seeded: the same every time
    same = stats.versus([base], base, "exact")
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0]
    # the same 20-point gain made by 2 of the 6 prompts only: the prompt level must widen the interval
    clustered = {k: dict(v) for k, v in base.items()}
    for k in keys:
        if k[0] in ("prompt 0", "prompt 1"):
            clustered[k]["exact"] = True  # these two prompts always right; the other four as the base
    c = stats.versus([clustered], base, "exact")
    diffs = np.array([100.0 * (clustered[k]["exact"] - base[k]["exact"]) for k in keys])
    flat = np.percentile(diffs[rng.integers(0, len(diffs), (2000, len(diffs)))].mean(1), [2.5, 97.5])
    assert c["ci95"][1] - c["ci95"][0] > 1.5 * (flat[1] - flat[0])
    # several loop seeds: the delta is their mean, the runs' spread enters the interval
    lucky = {k: {"exact": True} for k in keys}
    mean = stats.versus([base, lucky, base], base, "exact")
    assert mean["runs"] == 3 and mean["delta"] == pytest.approx(100 * len(wrong) / 240 / 3, abs=0.01)
    assert mean["ci95"][0] <= 0.01
    with pytest.raises(ValueError, match="missing"):
        stats.versus([{keys[0]: base[keys[0]]}], base, "exact")


def test_protocol_prompt_sets_are_disjoint_and_held_out():
    from experiments.shapes.protocol import PROTOCOL

    targets, gate = PROTOCOL.target_prompts(), PROTOCOL.gate_prompts()
    guards = [p for group in PROTOCOL.guard_prompts().values() for p in group]
    assert len(targets) == len(set(targets)) == 24 and len(gate) == len(set(gate)) == 12
    assert not set(targets) & set(gate) and not set(guards) & set(gate) and not set(targets) & set(guards)
    for p in targets:
        spec = world.parse_caption(p)
        assert world.is_held_out(spec) and spec.shape == "circle" and spec.colour in PROTOCOL.colours
    gate_specs = [world.parse_caption(p) for p in gate]
    assert not any(world.is_held_out(s) for s in gate_specs)  # the loop's combinations...
    assert {s.colour for s in gate_specs} >= set(PROTOCOL.colours)  # ...with the weak colours among them
    target_combos = {(s.count, s.background) for s in map(world.parse_caption, targets)}
    assert not target_combos & {(s.count, s.background) for s in gate_specs}
    cfg = load_config("configs/shapes.yaml")
    assert cfg.prompter.n_validation == len(gate) and len(cfg.evaluator.seeds) * len(gate) >= 192
    assert not set(PROTOCOL.final_seeds) & set(PROTOCOL.dev_seeds)
    assert not set(cfg.evaluator.seeds) & (set(PROTOCOL.final_seeds) | set(PROTOCOL.dev_seeds))


def test_dev_run_uses_the_dev_seeds_and_dev_loop_seeds(monkeypatch, tmp_path):
    import ccsr.cli
    from experiments.shapes import proof
    from experiments.shapes.measure_final import EXTRA_SEED_BASE
    from experiments.shapes.protocol import PROTOCOL, tasks

    p = PROTOCOL
    assert EXTRA_SEED_BASE > max(p.final_seeds[-1], p.dev_seeds[-1])
    assert not set(p.loop_seeds) & set(p.dev_loop_seeds)
    calls = []
    monkeypatch.setattr(ccsr.cli, "main", lambda argv: calls.append(argv) or 0)
    for dev in (False, True):
        s = proof.Settings(dev=dev, work_dir=tmp_path, base_model="m")
        assert s.seeds == (p.dev_seeds if dev else p.final_seeds)
        names = tasks(["base", "ccsr", "control", "no-gate"], s.loop_seeds)
        seeds = p.dev_loop_seeds if dev else p.loop_seeds
        assert names == [
            "base",
            *(f"ccsr@{x}" for x in seeds),
            *(f"control@{x}" for x in seeds),
            f"no-gate@{seeds[0]}",
        ]
        proof.run_loop(s, names[-1])
    reported, dev_run = calls
    assert f"seed={p.loop_seeds[0]}" in reported and f"seed={p.dev_loop_seeds[0]}" in dev_run
    assert "gate.enabled=false" in reported and "generator.model=m" in reported


def test_variants_that_read_another_need_it(capsys):
    from experiments.shapes.proof import main

    for variants in (["base", "ground-truth"], ["base", "control"]):
        with pytest.raises(SystemExit):
            main(["--variants", *variants])
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


def test_proof_schedule_starts_loops_first_and_dependants_after_what_they_read():
    from experiments.shapes import proof
    from experiments.shapes.protocol import DEFAULT_VARIANTS, PROTOCOL, VARIANTS, needs, split, tasks

    names = tasks(list(DEFAULT_VARIANTS), PROTOCOL.loop_seeds)
    order = proof.schedule(names, PROTOCOL.loop_seeds)
    assert sorted(order) == sorted(names)
    loops = [n for n in order if VARIANTS[split(n)[0]][1] == "loop"]
    assert order[: len(loops)] == loops
    for name in names:
        if needs(name, PROTOCOL.loop_seeds) is not None:
            assert order.index(needs(name, PROTOCOL.loop_seeds)) < order.index(name)
    assert needs(f"control@{PROTOCOL.loop_seeds[1]}", PROTOCOL.loop_seeds) == f"ccsr@{PROTOCOL.loop_seeds[1]}"


def test_judge_accuracy_reads_the_answers_as_the_score_does(tmp_path):
    """An image with no circle: the measuring judge says no to Q3 and whatever to Q4-Q7, which the score reads
    as 'nan'. Graded against the evaluator (no circle: count and colour wrong), a perfect judge agrees on
    every question, the dependents included."""
    from experiments.shapes import measure_final

    prompt = "one purple circle on a white background"
    square = world.SceneSpec("square", 1, "purple", "white")
    image = world.render(square, world.place_objects(square, random.Random(0)))
    image.save(measure_final.image_path(tmp_path, 0, 3))
    rows = {(prompt, 3): measure_final.score_image(prompt, image)}
    assert not rows[(prompt, 3)]["present"] and not rows[(prompt, 3)]["colour"]
    got = measure_final.judge_accuracy(
        _cfg("circle", "judge.model=shapes-measurement"), tmp_path, [(prompt, [3])], rows
    )
    assert got["per_question"] == dict.fromkeys(measure_final.QUESTION_GRADES, 100.0)
