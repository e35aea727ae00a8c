"""``gate.rule: paired_bootstrap``: the paired, hierarchical-bootstrap test of a LoRA's gain over the champion.

No model is built: the per-image values are made here, either handed to ``gate.decide`` directly or written as
evaluation records and read back the way the loop reads them (``gate.paired_images``)."""

from __future__ import annotations

import numpy as np
import pytest

from ccsr import gate
from ccsr.config import Config, ConfigError, GateConfig
from ccsr.config_files import load_config
from ccsr.loop import Loop
from ccsr.records import EvalRecord, write_records
from ccsr.rundir import RunDir, read_json, read_jsonl
from ccsr.seeds import derive_seed

PROMPTS = [f"val-{i:03d}" for i in range(12)]
SEEDS = [0, 1, 2, 3]
Values = dict[tuple[str, int], float]


def base_scores(seed: int = 7) -> Values:
    """Eq. 1 scores of the base model's images: integers 0..5, different per prompt and seed."""
    rng = np.random.default_rng(seed)
    return {(p, s): float(rng.integers(0, 6)) for p in PROMPTS for s in SEEDS}


def shifted(values: Values, by: dict[tuple[str, int], float] | float) -> Values:
    return {key: v + (by if isinstance(by, float) else by.get(key, 0.0)) for key, v in values.items()}


def evaluation(by_scale: dict[float, Values], metric: str = "judge_score") -> tuple[dict, dict]:
    """The summary (means per scale, as ``evaluation.summarise`` gives them) and the per-image values of one
    evaluation, from the same numbers: the mean rule and the paired rule see the same data."""
    summary = {"by_scale": {f"{s:g}": {metric: sum(v.values()) / len(v)} for s, v in by_scale.items()}}
    return summary, by_scale


def paired(**settings) -> GateConfig:
    return GateConfig(metric="judge_score", rule="paired_bootstrap", **settings)


def noisy_tiny_gain() -> Values:
    """Iteration k's scores: the base's plus noise of mean about +0.04 per image, most of it one prompt."""
    rng = np.random.default_rng(3)
    noise = {(p, s): float(rng.choice([-1.0, 0.0, 1.0])) for p in PROMPTS for s in SEEDS}
    noise = {key: v - sum(noise.values()) / len(noise) for key, v in noise.items()}  # mean exactly 0
    for s in SEEDS:
        noise[(PROMPTS[0], s)] += 0.5  # mean gain 2 / 48
    return shifted(base_scores(), noise)


# --- decide, pure -------------------------------------------------------------------------------------------


def test_a_clearly_better_lora_is_accepted_and_the_statistics_are_recorded():
    base = base_scores()
    summary, by_scale = evaluation({0.0: base, 0.5: shifted(base, 0.5), 1.0: shifted(base, 1.0)})
    images = gate.PairedImages(by_scale, None, seed=11)
    entry = gate.decide(paired(), 1, summary, gate.Champion(), "unused", images)
    assert entry["accepted"] and entry["scale"] == 1.0
    assert entry["rule"] == "paired_bootstrap" and entry["scales_considered"] == 2
    assert entry["mean_difference"] == pytest.approx(1.0)
    assert entry["interval"] == pytest.approx([1.0, 1.0]), "every image gains exactly 1: no spread"
    assert (entry["prompts"], entry["images"]) == (12, 48)
    assert (entry["bootstrap_draws"], entry["bootstrap_seed"], entry["confidence"]) == (2000, 11, 0.95)
    assert entry["resample"] == "prompts"
    assert "lower end > margin 0" in entry["reason"] and "best of 2" in entry["reason"]


def test_a_tiny_noisy_gain_passes_the_mean_rule_and_fails_the_paired_one():
    base = base_scores()
    summary, by_scale = evaluation({0.0: base, 1.0: noisy_tiny_gain()})
    by_mean = gate.decide(GateConfig(metric="judge_score"), 1, summary, gate.Champion(), "unused")
    assert by_mean["accepted"], "the mean rule takes any gain above the margin"
    assert "rule" not in by_mean and "interval" not in by_mean, "a mean-rule entry is as it always was"
    entry = gate.decide(paired(), 1, summary, gate.Champion(), "unused", gate.PairedImages(by_scale, None, 5))
    assert not entry["accepted"] and "lower end <= margin" in entry["reason"]
    low, high = entry["interval"]
    assert entry["mean_difference"] == pytest.approx(2 / 48, abs=1e-6)  # recorded to 6 decimals
    assert low <= 0.0 < entry["mean_difference"] < high


def test_a_tie_is_rejected():
    base = base_scores()
    summary, by_scale = evaluation({0.0: base, 1.0: dict(base)})
    entry = gate.decide(paired(), 1, summary, gate.Champion(), "unused", gate.PairedImages(by_scale, None, 5))
    assert not entry["accepted"] and entry["interval"] == [0.0, 0.0]


def test_the_margin_applies_to_the_lower_end():
    base = base_scores()
    summary, by_scale = evaluation({0.0: base, 1.0: shifted(base, 1.0)})
    images = gate.PairedImages(by_scale, None, 5)
    assert gate.decide(paired(margin=0.9), 1, summary, gate.Champion(), "", images)["accepted"]
    assert not gate.decide(paired(margin=1.0), 1, summary, gate.Champion(), "", images)["accepted"]


def test_same_inputs_give_the_same_decision_whatever_the_order_of_the_keys():
    base = base_scores()
    summary, by_scale = evaluation({0.0: base, 1.0: noisy_tiny_gain()})
    first = gate.decide(paired(), 2, summary, gate.Champion(), "", gate.PairedImages(by_scale, None, 5))
    reordered = {s: dict(reversed(list(v.items()))) for s, v in reversed(list(by_scale.items()))}
    again = gate.decide(paired(), 2, summary, gate.Champion(), "", gate.PairedImages(reordered, None, 5))
    assert again == first
    # Two-stage draws: a mean of resampled images takes many values, so another seed moves the quantiles
    # (the prompt-level mean of 12 prompts takes few, and two seeds can give the same interval).
    two_stage = paired(resample="prompts_and_seeds")
    one = gate.decide(two_stage, 2, summary, gate.Champion(), "", gate.PairedImages(by_scale, None, 5))
    other = gate.decide(two_stage, 2, summary, gate.Champion(), "", gate.PairedImages(by_scale, None, 6))
    assert other["interval"] != one["interval"], "the interval is drawn from the bootstrap seed"


@pytest.mark.parametrize("seeds_too", [False, True])
def test_the_bootstrap_resamples_prompts(seeds_too):
    """Half the prompts gain 1 on every seed, half gain nothing: the spread is between prompts, which a
    resampling of prompts sees (an interval of prompt means), and a zero difference never varies."""
    differences = {(p, s): float(i % 2) for i, p in enumerate(PROMPTS) for s in SEEDS}
    mean, low, high = gate.paired_interval(differences, 4000, 0.95, seed=1, seeds_too=seeds_too)
    assert mean == pytest.approx(0.5)
    assert low < 0.3 and high > 0.7, "12 prompts, 6 gaining: the interval is wide"
    zero = dict.fromkeys(differences, 0.0)
    assert gate.paired_interval(zero, 500, 0.95, seed=1, seeds_too=seeds_too) == (0.0, 0.0, 0.0)
    uneven = {("a", 0): 1.0, ("a", 1): 1.0, ("b", 0): 3.0}  # prompts with different seed counts
    mean, low, high = gate.paired_interval(uneven, 500, 0.95, seed=1, seeds_too=seeds_too)
    assert mean == pytest.approx(5 / 3) and 1.0 <= low <= high <= 3.0


def test_resampling_seeds_within_prompts_counts_their_noise_twice():
    """Every prompt gains the same on average, each seed is noisy: there is no spread between prompts beyond
    what the seeds put into the prompt means. The prompt-level interval has the width of the mean's standard
    error; the two-stage one is wider by about the square root of 2."""
    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(40)]
    differences = {(p, s): 0.5 + float(rng.normal()) for p in prompts for s in range(16)}
    _, low, high = gate.paired_interval(differences, 4000, 0.95, seed=2)
    _, low2, high2 = gate.paired_interval(differences, 4000, 0.95, seed=2, seeds_too=True)
    values = np.array(list(differences.values()))
    se = values.std() / np.sqrt(len(values))
    assert (high - low) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.2)
    assert (high2 - low2) / (high - low) == pytest.approx(np.sqrt(2), abs=0.25)


def test_one_prompt_resamples_its_seeds():
    differences = {("only", s): float(s % 2) for s in range(20)}
    mean, low, high = gate.paired_interval(differences, 2000, 0.95, seed=1)
    assert mean == pytest.approx(0.5) and low < 0.4 and high > 0.6, "not the zero width of one prompt"


def test_paired_rule_without_the_per_image_values_is_an_error():
    summary, _ = evaluation({0.0: base_scores(), 1.0: base_scores()})
    with pytest.raises(gate.GateError, match="per-image"):
        gate.decide(paired(), 1, summary, gate.Champion(), "")


def test_the_gate_disabled_accepts_without_testing():
    summary, by_scale = evaluation({0.0: base_scores(), 1.0: base_scores()})
    entry = gate.decide(
        paired(enabled=False), 1, summary, gate.Champion(), "", gate.PairedImages(by_scale, None, 5)
    )
    assert entry["accepted"] and entry["reason"] == "gate disabled"


# --- through the run directory, as the loop reads it ----------------------------------------------------------


def measures(v: float) -> dict:
    return {"clip_score": 20.0 + v, "judge_score": round(v), "confidence": 0.9, "detected": v >= 3}


def write_eval(run: RunDir, k: int, by_scale: dict[float, Values]) -> dict:
    """Iteration k's evaluation records (judge score per image, detection at score >= 3) and its summary."""
    records = [
        EvalRecord(p, "a giraffe", s, derive_seed(0, "eval", p, s), scale, f"x/{p}-{s}.png", **measures(v))
        for scale, values in by_scale.items()
        for (p, s), v in values.items()
    ]
    write_records(run.eval_dir(k) / "records.jsonl", records)
    return evaluation(by_scale)[0]


def make_loop(tmp_path, **settings) -> Loop:
    cfg = Config(class_name="giraffe", seed=3)
    cfg.gate.metric, cfg.gate.rule = "judge_score", "paired_bootstrap"
    for key, value in settings.items():
        setattr(cfg.gate, key, value)
    cfg.validate()
    return Loop(cfg, RunDir(tmp_path / "run"))


def gate_from_records(loop: Loop, k: int, summary: dict) -> dict:
    """What ``Loop.stage_eval`` does after the evaluation: read the images, decide, record."""
    return gate.gate_iteration(
        loop.cfg.gate, loop.run, k, summary, images=gate.paired_images(loop.cfg, loop.run, k)
    )


def test_the_champion_is_the_base_then_an_earlier_iteration(tmp_path):
    loop = make_loop(tmp_path)
    base = base_scores()
    first = gate_from_records(loop, 1, write_eval(loop.run, 1, {0.0: base, 0.5: shifted(base, 1.0)}))
    assert first["accepted"] and first["scale"] == 0.5
    entry = read_json(loop.run.champion_path)["history"][0]
    assert entry["bootstrap_seed"] == derive_seed(3, "gate", 1) and entry["images"] == 48

    # Iteration 2 beats the base (its own scale 0) by 1 but only ties iteration 1's images at scale 0.5.
    second = gate_from_records(loop, 2, write_eval(loop.run, 2, {0.0: base, 1.0: shifted(base, 1.0)}))
    assert not second["accepted"], "compared with the champion's images, not with the base"
    assert read_json(loop.run.champion_path)["history"][1]["interval"] == [0.0, 0.0]
    assert gate.champion_before(loop.run, 3).iteration == 1

    third = gate_from_records(loop, 3, write_eval(loop.run, 3, {0.0: base, 1.0: shifted(base, 2.0)}))
    assert third["accepted"]
    history = read_json(loop.run.champion_path)["history"]
    assert history[2]["mean_difference"] == pytest.approx(1.0), "against iteration 1 at 0.5, not the base"
    assert read_json(loop.run.champion_path)["champion"]["iteration"] == 3
    events = [e for e in read_jsonl(loop.run.events_path) if e["event"] == "gate"]
    assert [e["interval"] for e in events] == [h["interval"] for h in history]


def test_a_redone_gate_decides_identically(tmp_path):
    """A SIGKILL after the gate recorded but before the eval stage was marked done: the redo replaces the
    entry with the same one (the bootstrap seed comes from the config seed and k, not from a clock)."""
    loop = make_loop(tmp_path)
    summary = write_eval(loop.run, 1, {0.0: base_scores(), 1.0: noisy_tiny_gain()})
    gate_from_records(loop, 1, summary)
    before = read_json(loop.run.champion_path)
    again = make_loop(tmp_path)  # a new process on the same run directory
    gate_from_records(again, 1, summary)
    assert read_json(again.run.champion_path) == before and len(before["history"]) == 1
    first, redo = [e for e in read_jsonl(loop.run.events_path) if e["event"] == "gate"]
    assert {**first, "time": 0} == {**redo, "time": 0}


def test_images_that_do_not_pair_are_a_recorded_rejection(tmp_path):
    loop = make_loop(tmp_path)
    base = base_scores()
    assert gate_from_records(loop, 1, write_eval(loop.run, 1, {0.0: base, 1.0: shifted(base, 1.0)}))[
        "accepted"
    ]
    # Iteration 2 was evaluated on two more seeds (evaluator.seeds changed): 24 of its images have no partner.
    more = {(p, s): 2.0 for p in PROMPTS for s in (4, 5)}
    bigger = {**shifted(base, 3.0), **more}
    result = gate_from_records(loop, 2, write_eval(loop.run, 2, {0.0: {**base, **more}, 1.0: bigger}))
    assert not result["accepted"] and "do not pair" in result["reason"]
    entry = read_json(loop.run.champion_path)["history"][1]
    assert entry["unpaired"] == {"candidate": 24, "champion": 0} and "interval" not in entry
    assert gate.champion_before(loop.run, 3).iteration == 1, "the champion stays"
    # The champion's records lost: nothing pairs either.
    (loop.run.eval_dir(1) / "records.jsonl").unlink()
    result = gate_from_records(loop, 3, write_eval(loop.run, 3, {0.0: base, 1.0: shifted(base, 3.0)}))
    assert not result["accepted"]
    assert read_json(loop.run.champion_path)["history"][2]["unpaired"] == {"candidate": 48, "champion": 0}


def test_detection_is_paired_as_0_or_1(tmp_path):
    loop = make_loop(tmp_path, metric="detection_rate")
    never = dict.fromkeys(base_scores(), 0.0)
    write_eval(loop.run, 1, {0.0: never, 1.0: shifted(never, 5.0)})  # detected where the score is >= 3
    images = gate.paired_images(loop.cfg, loop.run, 1)
    assert set(images.by_scale[0.0].values()) == {0.0} and set(images.by_scale[1.0].values()) == {1.0}
    summary = {"by_scale": {"0": {"detection_rate": 0.0}, "1": {"detection_rate": 1.0}}}
    assert gate_from_records(loop, 1, summary)["accepted"]
    assert read_json(loop.run.champion_path)["history"][0]["mean_difference"] == 1.0


def test_the_mean_rule_reads_no_images(tmp_path):
    loop = make_loop(tmp_path, rule="mean")
    assert gate.paired_images(loop.cfg, loop.run, 1) is None


# --- config ------------------------------------------------------------------------------------------------


def test_the_defaults_keep_the_mean_rule():
    cfg = GateConfig()
    assert (cfg.rule, cfg.bootstrap_draws, cfg.confidence) == ("mean", 2000, 0.95)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rule": "t_test"}, r"'gate\.rule' must be one of mean, paired_bootstrap"),
        ({"bootstrap_draws": 50}, r"'gate\.bootstrap_draws' must be >= 100, got 50"),
        ({"bootstrap_draws": 2000.0}, r"'gate\.bootstrap_draws' must be an integer"),
        ({"confidence": 1.0}, r"'gate\.confidence' must be within \(0, 1\)"),
        ({"confidence": 0.0}, r"'gate\.confidence' must be within \(0, 1\)"),
        ({"resample": "images"}, r"'gate\.resample' must be one of prompts, prompts_and_seeds"),
        ({"rule": "paired_bootstrap"}, r"'gate\.rule' paired_bootstrap pairs per-image values"),
        ({"rule": "paired_bootstrap", "metric": "win_rate"}, r"gate\.metric win_rate has none"),
    ],
)
def test_bad_gate_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        GateConfig(**settings)


def test_the_yaml_keys_load_and_are_checked(repo_root):
    cfg = load_config(
        repo_root / "configs" / "tiny.yaml",
        [
            "gate.rule=paired_bootstrap",
            "gate.metric=clip_score",
            "gate.bootstrap_draws=500",
            "gate.confidence=0.9",
        ],
    )
    assert (cfg.gate.rule, cfg.gate.bootstrap_draws, cfg.gate.confidence) == ("paired_bootstrap", 500, 0.9)
    with pytest.raises(ConfigError, match=r"gate\.bootstrap_draws"):
        load_config(repo_root / "configs" / "tiny.yaml", ["gate.bootstrap_draws=many"])
    with pytest.raises(ConfigError, match=r"'gate\.rule' paired_bootstrap"):
        load_config(repo_root / "configs" / "tiny.yaml", ["gate.rule=paired_bootstrap"])  # tiny: win_rate
