"""The improvement gate's bookkeeping: forced accept and reject, the champion used by the next iteration."""

from ccsr.config import Config
from ccsr.loop import Loop
from ccsr.rundir import RunDir, read_json


def summary(win_rates: dict[str, float]) -> dict:
    by_scale = {s: {"win_rate": w, "clip_score": 20.0 + w} for s, w in win_rates.items()}
    best = max((s for s in win_rates if s != "0"), key=lambda s: win_rates[s])
    return {"by_scale": by_scale, "best_scale": float(best), "win_rate": win_rates[best]}


def make_loop(tmp_path, **gate) -> Loop:
    cfg = Config(class_name="giraffe")
    for key, value in gate.items():
        setattr(cfg.gate, key, value)
    run = RunDir(tmp_path)
    for k in (1, 2, 3):
        (run.lora_dir(k)).mkdir(parents=True)
        (run.lora_dir(k) / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    return Loop(cfg, run)


def test_gate_accepts_then_rejects_with_reasons(tmp_path):
    loop = make_loop(tmp_path, margin=0.1)
    first = loop._gate(1, summary({"0": 0.0, "0.5": 0.5, "1": 0.25}))
    assert first["accepted"] and first["scale"] == 0.5 and "0.5000 > 0.0000" in first["reason"]
    assert loop.champion(before=2)["iteration"] == 1
    assert loop.previous_lora(2) == loop.run.lora_dir(1)
    second = loop._gate(2, summary({"0": 0.0, "0.5": 0.55, "1": 0.3}))
    assert not second["accepted"] and "<=" in second["reason"]  # 0.55 is not above 0.5 + 0.1
    assert loop.previous_lora(3) == loop.run.lora_dir(1), "a rejected LoRA never becomes the champion"
    third = loop._gate(3, summary({"0": 0.0, "0.5": 0.2, "1": 0.75}))
    assert third["accepted"] and third["scale"] == 1.0
    state = read_json(tmp_path / "champion.json")
    assert state["champion"]["iteration"] == 3
    assert [h["accepted"] for h in state["history"]] == [True, False, True]


def test_gate_rejects_a_lora_no_better_than_the_base(tmp_path):
    loop = make_loop(tmp_path, margin=0.0)
    result = loop._gate(1, summary({"0": 0.0, "0.5": 0.0, "1": 0.0}))
    assert not result["accepted"]
    assert loop.previous_lora(2) is None, "the next iteration generates with the base model"


def test_gate_disabled_accepts_and_redo_is_idempotent(tmp_path):
    loop = make_loop(tmp_path, enabled=False)
    loop._gate(1, summary({"0": 0.0, "0.5": 0.0, "1": 0.0}))
    loop._gate(1, summary({"0": 0.0, "0.5": 0.0, "1": 0.0}))
    state = read_json(tmp_path / "champion.json")
    assert len(state["history"]) == 1 and state["history"][0]["reason"] == "gate disabled"


def test_gate_on_clip_score_compares_with_the_base_at_scale_0(tmp_path):
    loop = make_loop(tmp_path, metric="clip_score")
    s = summary({"0": 0.0, "0.5": 0.0, "1": 0.0})  # clip 20.0 everywhere
    assert not loop._gate(1, s)["accepted"]
    s["by_scale"]["1"]["clip_score"] = 21.0
    assert loop._gate(2, s)["accepted"]
