"""``ccsr status``: what a run directory holds, as one JSON object or a short table."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from ccsr.rundir import STAGES, RunDir, read_json, read_jsonl


def _count(path: Path) -> int:
    return len(read_jsonl(path)) if path.exists() else 0


def run_status(root: str | Path) -> dict[str, Any]:
    run = RunDir(root)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{root} is not a ccsr run directory (no config.yaml)")
    cfg = yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}
    base_model = cfg.get("generator", {}).get("model")
    from ccsr.models import is_embedded, model_path

    if base_model and is_embedded(base_model):
        try:
            base_model = str(model_path(base_model, cfg.get("model_cache")))  # status never builds models
        except ValueError:
            pass

    iterations = []
    stage = "done"
    completed = 0
    for k in run.iterations():
        files = run.files(k)
        done = run.stages_done(k)
        lora = run.lora_dir(k)
        complete = all(s in done for s in STAGES)
        completed += complete
        if not complete and stage == "done":
            stage = next(s for s in STAGES if s not in done)
        eval_obj = read_json(run.eval_path(k))
        iterations.append(
            {
                "index": k,
                "complete": complete,
                "stages_done": [s for s in STAGES if s in done],
                "stage_seconds": {s: done[s].get("seconds") for s in STAGES if s in done},
                "prompts": _count(files["prompts"]),
                "candidates": _count(files["candidates"]),
                "judged": _count(files["judgments"]),
                "detections": _count(files["detections"]),
                "pairs": _count(files["pairs"]),
                "prompt_stats": {
                    key: done.get("prompts", {}).get(key) for key in ("dropped", "attempts", "diversity")
                },
                "lora": str(lora) if (lora / "pytorch_lora_weights.safetensors").is_file() else None,
                "files": {name: str(path) for name, path in files.items()},
                "eval": eval_obj,
            }
        )
    heartbeat = read_json(run.root / "heartbeat.json")
    if heartbeat:
        heartbeat["age_seconds"] = round(time.time() - heartbeat.get("time", 0), 1)
        heartbeat["alive"] = _pid_alive(heartbeat.get("pid")) and _locked(run)
    target = cfg.get("iterations", 0)
    if stage == "done" and completed < target:
        stage = "pending"
    return {
        "run_dir": str(run.root),
        "class": cfg.get("class_name"),
        "base_model": base_model,
        "iterations_target": target,
        "iterations_completed": completed,
        "stage": stage,
        "validation_prompts": _count(run.validation_path),
        "champion": (read_json(run.root / "champion.json", default={}) or {}).get("champion"),
        "champion_history": (read_json(run.root / "champion.json", default={}) or {}).get("history", []),
        "heartbeat": heartbeat,
        "iterations": iterations,
    }


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked(run: RunDir) -> bool:
    """True while some process holds the run lock (the lock dies with its process, so no stale locks)."""
    from filelock import FileLock, Timeout

    if not run.lock_path.exists():
        return False
    lock = FileLock(str(run.lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def find_runs(root: str | Path) -> list[Path]:
    """``root`` itself when it is a run directory, else the run directories one level below it."""
    root = Path(root)
    if (root / "config.yaml").is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "config.yaml").is_file())


def _champion_text(champion: dict | None) -> str:
    if not champion or champion.get("iteration") is None:
        return "base model"
    return f"iteration {champion['iteration']} at scale {champion['scale']:g} ({champion.get('lora')})"


def _heartbeat_text(hb: dict | None) -> str:
    if not hb:
        return "never started"
    where = " ".join(str(hb[k]) for k in ("iteration", "stage", "unit") if hb.get(k) is not None)
    state = "running" if hb.get("alive") else "not running"
    return f"{state} (pid {hb.get('pid')}, last heartbeat {hb['age_seconds']:.0f} s ago{', at ' + where if where else ''})"


def format_summary(statuses: list[dict[str, Any]]) -> str:
    lines = [f"{'class':<24} {'iterations':>10} {'stage':<12} {'pairs':>5} {'best win-rate':>13}  process"]
    for st in statuses:
        pairs = sum(it["pairs"] for it in st["iterations"])
        rates = [it["eval"]["win_rate"] for it in st["iterations"] if it.get("eval")]
        best = f"{max(rates):.2f}" if rates else "-"
        hb = st.get("heartbeat") or {}
        proc = f"running (pid {hb.get('pid')})" if hb.get("alive") else "-"
        done = f"{st['iterations_completed']}/{st['iterations_target']}"
        lines.append(f"{str(st['class']):<24} {done:>10} {st['stage']:<12} {pairs:>5} {best:>13}  {proc}")
    return "\n".join(lines)


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"run      {status['run_dir']}",
        f"class    {status['class']}",
        f"model    {status['base_model']}",
        f"progress {status['iterations_completed']}/{status['iterations_target']} iterations, stage: {status['stage']}",
        f"champion {_champion_text(status.get('champion'))}",
        f"process  {_heartbeat_text(status.get('heartbeat'))}",
        "",
        f"{'iter':>4} {'prompts':>7} {'cands':>6} {'judged':>6} {'pairs':>5} {'win-rate':>8} {'scale':>5}  lora",
    ]
    for it in status["iterations"]:
        ev = it["eval"] or {}
        wr = f"{ev['win_rate']:.2f}" if "win_rate" in ev else "-"
        sc = f"{ev['best_scale']:g}" if "best_scale" in ev else "-"
        lines.append(
            f"{it['index']:>4} {it['prompts']:>7} {it['candidates']:>6} {it['judged']:>6} {it['pairs']:>5} "
            f"{wr:>8} {sc:>5}  {it['lora'] or '-'}"
        )
    return "\n".join(lines)
