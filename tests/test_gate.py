"""The improvement gate's bookkeeping: forced accept and reject, the champion used by the next iteration.

No model is built: the gate reads evaluation summaries and writes champion.json."""

import pytest

from ccsr import gate
from ccsr.config import Config, GateConfig
from ccsr.rundir import RunDir, read_json, read_jsonl


def summary(win_rates: dict[str, float]) -> dict:
    by_scale = {s: {"win_rate": w, "clip_score": 20.0 + w} for s, w in win_rates.items()}
    best = max((s for s in win_rates if s != "0"), key=lambda s: win_rates[s])
    return {"by_scale": by_scale, "best_scale": float(best), "win_rate": win_rates[best]}


def make_run(tmp_path, **settings) -> tuple[GateConfig, RunDir]:
    cfg = Config(class_name="giraffe")
    for key, value in settings.items():
        setattr(cfg.gate, key, value)
    run = RunDir(tmp_path)
    for k in (1, 2, 3):
        run.lora_dir(k).mkdir(parents=True)
        run.lora_file(k).write_bytes(b"x")
    return cfg.gate, run


def test_gate_accepts_then_rejects_with_reasons(tmp_path):
    cfg, run = make_run(tmp_path, margin=0.1)
    first = gate.gate_iteration(cfg, run, 1, summary({"0": 0.0, "0.5": 0.5, "1": 0.25}))
    assert first["accepted"] and first["scale"] == 0.5 and "0.5000 > 0.0000" in first["reason"]
    assert gate.champion_before(run, 2).iteration == 1
    assert gate.champion_lora(run, 2) == run.lora_dir(1)
    second = gate.gate_iteration(cfg, run, 2, summary({"0": 0.0, "0.5": 0.55, "1": 0.3}))
    assert not second["accepted"] and "<=" in second["reason"]  # 0.55 is not above 0.5 + 0.1
    assert gate.champion_lora(run, 3) == run.lora_dir(1), "a rejected LoRA never becomes the champion"
    third = gate.gate_iteration(cfg, run, 3, summary({"0": 0.0, "0.5": 0.2, "1": 0.75}))
    assert third["accepted"] and third["scale"] == 1.0
    state = read_json(run.champion_path)
    assert state["champion"]["iteration"] == 3
    assert [h["accepted"] for h in state["history"]] == [True, False, True]
    assert gate.current_champion(run) == (run.lora_dir(3), 1.0)
    assert [e["event"] for e in read_jsonl(run.events_path)] == ["gate"] * 3


def test_gate_rejects_a_lora_no_better_than_the_base(tmp_path):
    cfg, run = make_run(tmp_path, margin=0.0)
    result = gate.gate_iteration(cfg, run, 1, summary({"0": 0.0, "0.5": 0.0, "1": 0.0}))
    assert not result["accepted"]
    assert gate.champion_lora(run, 2) is None, "the next iteration generates with the base model"
    assert gate.current_champion(run) == (None, 0.0)


def test_gate_disabled_accepts_and_redo_is_idempotent(tmp_path):
    cfg, run = make_run(tmp_path, enabled=False)
    gate.gate_iteration(cfg, run, 1, summary({"0": 0.0, "0.5": 0.0, "1": 0.0}))
    gate.gate_iteration(cfg, run, 1, summary({"0": 0.0, "0.5": 0.0, "1": 0.0}))
    state = read_json(run.champion_path)
    assert len(state["history"]) == 1 and state["history"][0]["reason"] == "gate disabled"


def test_gate_on_clip_score_compares_with_the_base_at_scale_0(tmp_path):
    cfg, run = make_run(tmp_path, metric="clip_score")
    s = summary({"0": 0.0, "0.5": 0.0, "1": 0.0})  # clip 20.0 everywhere
    assert not gate.gate_iteration(cfg, run, 1, s)["accepted"]
    s["by_scale"]["1"]["clip_score"] = 21.0
    assert gate.gate_iteration(cfg, run, 2, s)["accepted"]


def test_generation_scale_is_the_configured_one_or_the_accepted_one(tmp_path):
    cfg, run = make_run(tmp_path)
    assert gate.generation_scale(run, 1, None) == 0.0, "no champion: the base model draws (no LoRA)"
    gate.gate_iteration(cfg, run, 1, summary({"0": 0.0, "0.5": 0.5, "1": 0.25}))
    assert gate.generation_scale(run, 2, None) == 0.5, "null: the scale the gate accepted the champion at"
    assert gate.generation_scale(run, 2, 1.0) == 1.0, "a configured scale wins"
    gate.gate_iteration(cfg, run, 2, summary({"0": 0.0, "0.5": 0.1, "1": 0.2}))  # rejected
    assert gate.generation_scale(run, 3, None) == 0.5, "a rejected LoRA changes nothing"


def test_decide_is_pure_and_compares_with_the_champion():
    cfg = GateConfig(margin=0.05)
    s = summary({"0": 0.0, "0.5": 0.4, "1": 0.4})
    base = gate.decide(cfg, 1, s, gate.Champion(), "unused")
    assert base["accepted"] and base["scale"] == 0.5, "equal metrics: the lower scale wins"
    assert base["champion_metric"] == 0.0
    champion = gate.Champion(iteration=1, scale=0.5, metric=0.4)
    assert not gate.decide(cfg, 2, s, champion, "unused")["accepted"]  # 0.4 is not above 0.4 + 0.05
    skipped = gate.decide(cfg, 2, None, champion, "no validation prompts")
    assert not skipped["accepted"] and skipped["reason"] == "no validation prompts"
    assert skipped["metric"] is None and skipped["scale"] is None


def test_a_metric_the_evaluation_lacks_is_an_error_not_zero(tmp_path):
    cfg, run = make_run(tmp_path, metric="judge_score")
    with pytest.raises(gate.GateError, match="judge_score"):
        gate.gate_iteration(cfg, run, 1, summary({"0": 0.0, "1": 0.5}))
    assert not run.champion_path.exists(), "nothing is recorded for an evaluation the gate cannot read"
