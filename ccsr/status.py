"""``ccsr status``: what a run directory holds, as one JSON object or a short table.

Status reads every record strictly: a file or record that is damaged, or of a shape this version does not
write (a run directory of another ccsr version), ends in a RunDirError naming the file, which the command
line prints as one line. The only thing skipped is a torn last line of a JSON-lines file, the normal trace of
a crash mid-append, which the loop cuts off on its next start.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ccsr.distributed import read_committed
from ccsr.records import Candidate, Detection, Judgment, Pair, PromptRecord, read_records
from ccsr.rundir import DAMAGED, STAGES, RunDir, RunDirError, is_locked, read_json

logger = logging.getLogger(__name__)


def _base_model(cfg) -> str:
    """The generator's model as a path when it is embedded; status never builds a model to find it."""
    from ccsr.models import is_embedded, model_path

    name = cfg.generator.model
    if not is_embedded(name):
        return name
    try:
        return str(model_path(name, cfg.model_cache))
    except ValueError:  # an embedded name this version does not know: show it as the run wrote it
        logger.warning("status: %s is no embedded model of this ccsr version; showing the name", name)
        return name


_NUMBER = (int, float)
_NONE = type(None)


def _check(ok: bool, path: Path, what: str, problem: str) -> None:
    if not ok:
        raise RunDirError(
            f"{path}: not the {what} this ccsr version writes ({problem}; {DAMAGED}); repair the file or move "
            "it out of the run directory"
        )


def _check_fields(data: Any, path: Path, what: str, fields: dict[str, tuple[type, ...]], required=()) -> None:
    """``data`` is a mapping whose keys that status reads have the types this version writes."""
    _check(isinstance(data, dict), path, what, "not a mapping")
    for key, types in fields.items():
        _check(key in data or key not in required, path, what, f"no '{key}'")
        if key in data:
            found, expected = type(data[key]).__name__, " or ".join(t.__name__ for t in types)
            _check(isinstance(data[key], types), path, what, f"'{key}' is {found}, not {expected}")


def _mapping(
    path: Path, what: str, fields: dict[str, tuple[type, ...]], required=()
) -> dict[str, Any] | None:
    """A JSON file holding a mapping (None when it is missing), checked by ``_check_fields``."""
    data = read_json(path, strict=True)
    if data is not None:
        _check_fields(data, path, what, fields, required)
    return data


def _stages(run: RunDir, k: int) -> dict[str, Any]:
    """stages.json: a mapping per finished stage, with its wall time."""
    path = run.iteration_dir(k) / "stages.json"
    done = _mapping(path, "stage record", {}) or {}
    for stage in STAGES:
        if stage in done:
            _check_fields(done[stage], path, f"'{stage}' stage record", {"seconds": _NUMBER})
    return done


def _iteration(run: RunDir, k: int) -> dict[str, Any]:
    files = run.files(k)
    done = _stages(run, k)
    prompt_stage = done.get("prompts", {})
    return {
        "index": k,
        "complete": all(s in done for s in STAGES),
        "stages_done": [s for s in STAGES if s in done],
        "stage_seconds": {s: done[s].get("seconds") for s in STAGES if s in done},
        "prompts": len(read_records(files["prompts"], PromptRecord, strict=True)),
        # Under a launcher the ranks' units sit in shard files until the stage ends: count them too.
        "candidates": len(read_committed(files["candidates"], Candidate, strict=True)),
        "judged": len(read_committed(files["judgments"], Judgment, strict=True)),
        "detections": len(read_committed(files["detections"], Detection, strict=True)),
        "pairs": len(read_records(files["pairs"], Pair, strict=True)),
        "prompt_stats": {key: prompt_stage.get(key) for key in ("dropped", "attempts", "diversity")},
        "lora": str(run.lora_dir(k)) if run.lora_file(k).is_file() else None,
        "files": {name: str(path) for name, path in files.items()},
        "eval": _mapping(run.eval_path(k), "evaluation", {"win_rate": _NUMBER, "best_scale": _NUMBER}),
    }


def _heartbeat(run: RunDir) -> dict[str, Any] | None:
    heartbeat = _mapping(run.heartbeat_path, "heartbeat", {"pid": (int,), "time": _NUMBER}, ("pid", "time"))
    if heartbeat:
        heartbeat["age_seconds"] = round(time.time() - heartbeat["time"], 1)
        # The lock dies with its process, so a live pid without the lock is some other process by now.
        heartbeat["alive"] = _pid_alive(heartbeat["pid"]) and is_locked(run)
    return heartbeat


def _champion(run: RunDir) -> dict[str, Any]:
    """champion.json: the champion (none or no iteration: the base model) and the gate's history."""
    path, what = run.champion_path, "champion record"
    data = _mapping(path, what, {"champion": (dict, _NONE), "history": (list,)}) or {}
    champion = data.get("champion") or {}
    if champion.get("iteration") is not None:
        _check_fields(champion, path, what, {"iteration": (int,), "scale": _NUMBER}, ("scale",))
    return data


def run_status(root: str | Path) -> dict[str, Any]:
    """What ``root`` holds, read from its records only. Raises RunDirError when it is not a run directory, or
    when its config or a record cannot be read by this version (damaged, or another version's)."""
    from ccsr.config import ConfigError
    from ccsr.config_files import load_config

    run = RunDir(root)
    if not run.config_path.is_file():
        raise RunDirError(f"{root} is not a ccsr run directory (no config.yaml)")
    try:
        cfg = load_config(run.config_path)
    except ConfigError as exc:
        raise RunDirError(
            f"cannot read run {root} with this ccsr version (damaged, edited, or written by another "
            f"version): {exc}"
        ) from None
    iterations = [_iteration(run, k) for k in run.iterations()]
    completed = sum(it["complete"] for it in iterations)
    unfinished = next((it for it in iterations if not it["complete"]), None)
    if unfinished is not None:
        stage = next(s for s in STAGES if s not in unfinished["stages_done"])
    else:
        stage = "done" if completed >= cfg.iterations else "pending"
    champion = _champion(run)
    return {
        "run_dir": str(run.root),
        "class": cfg.class_name,
        "base_model": _base_model(cfg),
        "iterations_target": cfg.iterations,
        "iterations_completed": completed,
        "stage": stage,
        "validation_prompts": len(read_records(run.validation_path, PromptRecord, strict=True)),
        "champion": champion.get("champion"),
        "champion_history": champion.get("history", []),
        "heartbeat": _heartbeat(run),
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


def find_runs(root: str | Path) -> list[Path]:
    """``root`` itself when it is a run directory, else the run directories one level below it."""
    root = Path(root)
    if RunDir(root).config_path.is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if RunDir(p).config_path.is_file())


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
        rates = [it["eval"]["win_rate"] for it in st["iterations"] if "win_rate" in (it["eval"] or {})]
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
