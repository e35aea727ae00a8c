"""The proof's outputs, from the tasks' results: proof.json, the per-image rows, the tables, the grid.

Everything here is computed from the rows the final models' images were graded into (``measure_final``);
nothing is typed in. A final model that is the base (no LoRA accepted) reuses the base's rows and images.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.shapes import measure_final, stats, world
from experiments.shapes.protocol import SEEDED, SWEEP, VARIANTS, split, task

if TYPE_CHECKING:
    from experiments.shapes.proof import Settings

REPORTED = ("exact", "colour", "count")  # {value, delta_vs_base, ci95, images} each, per variant
RATES = ("ring", "two_tone", "lenient_colour", "lenient_exact")
ROWS_DIR = "proof-rows"
VALIDATION_PROBES = 20  # probes per kind in proof.json's evaluator validation table
GRID_SEEDS = 8
GRID_SCALE = 2  # nearest-neighbour upscaling of the 64 px images
GRID_LABEL_WIDTH = 110  # the model names' column
GRID_STRIP = 16  # the seeds' header and each prompt's heading


def _figure(rows_by_run: list, base: dict, metric: str, prompts: set[str]) -> dict:
    """``metric`` of the runs against the base on ``prompts``, on the images every run drew (best-of-n draws
    fewer seeds)."""
    base_part = {k: v for k, v in base.items() if k[0] in prompts and all(k in r for r in rows_by_run)}
    m = stats.versus([stats.subset(r, prompts) for r in rows_by_run], base_part, metric)
    return {
        "value": m["value"],
        "base_value": m["reference_value"],
        "delta_vs_base": m["delta"],
        "ci95": m["ci95"],
        "images": m["images"],
    }


def _block(rows_by_run: list, base: dict, prompts: set[str]) -> dict:
    return {metric: _figure(rows_by_run, base, metric, prompts) for metric in (*REPORTED, *RATES)}


def variant_results(s: Settings, variant: str, done: dict, base: dict) -> dict:
    """One variant's figures: the mean over its loop seeds (hierarchical interval), each seed, each weakness."""
    p = s.protocol
    names = [n for n in done if split(n)[0] == variant]
    rows_by_run = [done[n]["rows"] for n in names]
    targets = set(p.target_prompts()) & set().union(*({k[0] for k in r} for r in rows_by_run))
    block = _block(rows_by_run, base, targets)
    out = {"description": VARIANTS[variant][0], **{m: block[m] for m in REPORTED}}
    out["rates"] = {m: block[m] for m in RATES}
    out["final"] = block["exact"]  # the primary metric, under the key earlier proof.json files used
    out["by_weakness"] = {
        colour: {
            m: _figure(rows_by_run, base, m, {t for t in targets if p.colour_of(t) == colour})
            for m in REPORTED
        }
        for colour in p.colours
    }
    if len(names) > 1 or variant in SEEDED:
        out["per_loop_seed"] = {
            str(split(n)[1]): {m: _figure([done[n]["rows"]], base, m, targets) for m in REPORTED}
            | {"model": done[n]["model"]}
            for n in names
        }
    out["model"] = "; ".join(f"{n}: {done[n]['model']}" for n in names)
    for n in names:
        extra = {k: done[n][k] for k in ("champion", "loop", "best_of_n", "ground_truth") if k in done[n]}
        if extra:
            out.setdefault("runs", {})[n] = extra
    return out


def non_inferiority(s: Settings, done: dict, base: dict) -> dict:
    """The ccsr variant's do-no-harm figures: count on the target prompts, exact on each guard group."""
    p = s.protocol
    runs = [done[task("ccsr", seed)]["rows"] for seed in s.loop_seeds if task("ccsr", seed) in done]
    groups = {"count, target prompts": ("count", set(p.target_prompts()))}
    groups |= {f"exact, {name}": ("exact", set(prompts)) for name, prompts in p.guard_prompts().items()}
    out = {}
    for name, (metric, prompts) in groups.items():
        f = _figure(runs, base, metric, prompts)
        out[name] = {
            "delta": f["delta_vs_base"],
            "ci95": f["ci95"],
            "images": f["images"],
            "holds": f["ci95"][0] > p.non_inferiority_margin,
        }
    return out


def control_delta(s: Settings, done: dict) -> dict | None:
    """ccsr minus the matched control on exact, paired loop seed by loop seed and image by image."""
    seeds = [x for x in s.loop_seeds if task("ccsr", x) in done and task("control", x) in done]
    if not seeds:
        return None
    targets = set(s.protocol.target_prompts())
    ccsr = [stats.subset(done[task("ccsr", x)]["rows"], targets) for x in seeds]
    control = [stats.subset(done[task("control", x)]["rows"], targets) for x in seeds]
    m = stats.versus(ccsr, control, "exact")
    return {"delta": m["delta"], "ci95": m["ci95"], "images": m["images"], "loop_seeds": seeds}


def judge_sweep(s: Settings, done: dict, base: dict, accuracy: dict) -> list[dict]:
    """Exact gain at the first loop seed against the judge's flip rate and its measured answer accuracy."""
    out = []
    targets = set(s.protocol.target_prompts())
    for variant, flip in SWEEP.items():
        name = task(variant, s.loop_seeds[0])
        if name not in done:
            continue
        f = _figure([done[name]["rows"]], base, "exact", targets)
        out.append(
            {
                "variant": variant,
                "judge_flip": flip if flip is not None else accuracy["flip"],
                "judge_accuracy": accuracy["by_flip"].get(
                    str(flip if flip is not None else accuracy["flip"])
                ),
                "exact": {"delta": f["delta_vs_base"], "ci95": f["ci95"]},
            }
        )
    return out


def judge_record(s: Settings, done: dict) -> dict:
    """The loop's judge, and how often its answers agree with the evaluator's grades on generated images: the
    base's final images (every flip rate of the sweep) and the first ccsr run's final images."""
    from ccsr.config_files import load_config
    from experiments.shapes.backends import answer_noise
    from experiments.shapes.proof import common_overrides

    plan = s.plan()[: len(s.protocol.target_prompts())]
    base = done["base"]["rows"]
    cfg = load_config(s.config, common_overrides(s), class_name=s.protocol.class_name)
    flip = answer_noise(cfg.judge.model)
    by_flip = {}
    for rate in sorted({flip, *(f for f in SWEEP.values() if f is not None)}):
        model = "shapes-measurement" + ("" if rate == 0 else f"+flip={rate:g}")
        judged = load_config(
            s.config, [*common_overrides(s), f"judge.model={model}"], class_name=cfg.class_name
        )
        by_flip[str(rate)] = measure_final.judge_accuracy(judged, s.final_dir("base"), plan, base)["accuracy"]
    out = {
        "name": f"{cfg.judge.backend} ({cfg.judge.model})",
        "flip": flip,
        "by_flip": by_flip,
        "on_base_images": measure_final.judge_accuracy(cfg, s.final_dir("base"), plan, base),
    }
    first = task("ccsr", s.loop_seeds[0])
    if first in done:
        rows = done[first]["rows"]
        out["on_final_images"] = measure_final.judge_accuracy(cfg, s.final_dir(first), plan, rows)
    return out


def collect(s: Settings, done: dict, seconds: dict, started: float) -> dict:
    from experiments.shapes import evaluator

    base = done["base"]["rows"]
    for name, out in done.items():
        if out["rows"] is None:  # the base is the final model: its rows and images
            shutil.copytree(s.final_dir("base"), s.final_dir(name), dirs_exist_ok=True)
            out["rows"] = base
        seconds |= {f"{name}: {stage}": secs for stage, secs in out["seconds"].items()}
    variants = {v: variant_results(s, v, done, base) for v in s.variants}
    accuracy = judge_record(s, done)
    seconds["total"] = round(time.perf_counter() - started, 1)
    p = s.protocol
    return {
        "primary_metric": p.primary_metric,
        "minutes": round(seconds["total"] / 60, 2),
        "protocol": protocol_record(s),
        "base": {m: variants["base"][m]["value"] for m in REPORTED}
        | {"images": variants["base"]["exact"]["images"]},
        "variants": variants,
        "non_inferiority": non_inferiority(s, done, base),
        "control_delta": control_delta(s, done),
        "judge_sweep": judge_sweep(s, done, base, accuracy),
        "loop_seeds": list(s.loop_seeds),
        "target_prompts": p.target_prompts(),
        "judge": accuracy,
        "evaluator": {
            "name": "experiments.shapes.evaluator",
            "validation": evaluator.validation_table(n=VALIDATION_PROBES),
        },
        "seconds": seconds,
    }


def protocol_record(s: Settings) -> dict:
    p = s.protocol
    return {
        "class": p.class_name,
        "weaknesses": dict(p.weaknesses),
        "target_prompts": p.target_prompts(),
        "guard_prompts": p.guard_prompts(),
        "gate_prompts": p.gate_prompts(),
        "seed_set": "dev" if s.dev else "final",
        "seeds": [s.seeds.start, s.seeds.stop],  # start, stop (excluded)
        "guard_seeds": p.guard_seeds,
        "loop_seeds": list(s.loop_seeds),
        "best_of_n": p.best_of_n,
        "best_of_n_seeds": p.best_of_n_seeds,
        "iterations": s.iterations,
        "overrides": s.overrides,
        "non_inferiority_margin": p.non_inferiority_margin,
    }


# --------------------------------------------------------------------------------------------------------------
# the tables


def _ci(f: dict) -> str:
    return f"{f['ci95'][0]:+.1f} to {f['ci95'][1]:+.1f}"


def _cell(f: dict) -> str:
    return f"{f['value']:.1f} ({f['delta_vs_base']:+.1f}, {_ci(f)})"


def _headline(results: dict) -> list[str]:
    p = results["protocol"]
    weak = "; ".join(f"{colour} {p['class']}s, {kind}" for colour, kind in p["weaknesses"].items())
    lines = [
        f"## {results['primary_metric']}",
        "",
        f"{len(p['target_prompts'])} target prompts ({weak}), "
        f"seeds {p['seeds'][0]}-{p['seeds'][1] - 1} ({p['seed_set']} set), loop seeds {', '.join(map(str, p['loop_seeds']))}. "
        "Per cell: value % (delta in points against the base's image of the same prompt and seed, 95% interval "
        "of a bootstrap over loop seeds, prompts and seeds). Graded by experiments.shapes.evaluator.",
        "",
        "| variant | what | exact | colour | count | rings % | two-tone % | images |",
        "| --- | --- | :---: | :---: | :---: | ---: | ---: | ---: |",
    ]
    for name, v in results["variants"].items():
        r = v["rates"]
        lines.append(
            f"| {name} | {v['description']} | {_cell(v['exact'])} | {_cell(v['colour'])} | {_cell(v['count'])} "
            f"| {r['ring']['value']:.1f} | {r['two_tone']['value']:.1f} | {v['exact']['images']} |"
        )
    return lines


def _by_weakness(results: dict) -> list[str]:
    colours = list(results["protocol"]["weaknesses"])
    lines = [
        "## Per weakness",
        "",
        "| variant | " + " | ".join(f"{c}: exact | {c}: colour" for c in colours) + " |",
        "| --- | " + " | ".join(":---: | :---:" for _ in colours) + " |",
    ]
    for name, v in results["variants"].items():
        cells = [_cell(v["by_weakness"][c][m]) for c in colours for m in ("exact", "colour")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _per_seed(results: dict) -> list[str]:
    lines = ["## Per loop seed", "", "| variant | loop seed | final model | exact | colour | count |"]
    lines.append("| --- | ---: | --- | :---: | :---: | :---: |")
    for name, v in results["variants"].items():
        for seed, f in v.get("per_loop_seed", {}).items():
            lines.append(
                f"| {name} | {seed} | {f['model']} | {_cell(f['exact'])} | {_cell(f['colour'])} | {_cell(f['count'])} |"
            )
    return lines


def _checks(results: dict) -> list[str]:
    lines = ["## Do no harm (ccsr, mean over loop seeds)", ""]
    lines += ["| figure | delta (points) | 95% CI | images | holds (lower end above the margin) |"]
    lines += ["| --- | ---: | :---: | ---: | --- |"]
    for name, f in results["non_inferiority"].items():
        lines.append(
            f"| {name} | {f['delta']:+.1f} | {_ci(f)} | {f['images']} | {'yes' if f['holds'] else 'no'} |"
        )
    c = results["control_delta"]
    lines += ["", "## ccsr minus the matched control (exact, target prompts)", ""]
    lines.append(
        "not measured"
        if c is None
        else f"{c['delta']:+.1f} points (95% CI {_ci(c)}), loop seeds {c['loop_seeds']}"
    )
    lines += [
        "",
        "## Judge-quality sweep (first loop seed)",
        "",
        "| variant | flip rate | judge accuracy % | exact delta | 95% CI |",
    ]
    lines += ["| --- | ---: | ---: | ---: | :---: |"]
    for row in results["judge_sweep"]:
        lines.append(
            f"| {row['variant']} | {row['judge_flip']:g} | {row['judge_accuracy']} | {row['exact']['delta']:+.1f} | {_ci(row['exact'])} |"
        )
    j = results["judge"]
    lines += ["", f"The loop's judge: {j['name']}; its answers agree with the evaluator on "]
    lines[-1] += f"{j['on_base_images']['accuracy']:.1f}% of the graded questions on the base's images"
    if "on_final_images" in j:
        lines[-1] += f", {j['on_final_images']['accuracy']:.1f}% on the first ccsr run's final images"
    lines[-1] += "."
    return lines


def _iterations(results: dict) -> list[str]:
    lines = ["## The loops' own evaluations (gate prompts), graded", ""]
    header = "| run | iteration, scale | count % | colour % | exact % | judge score | win/tie/loss vs base | diversity |"
    for v in results["variants"].values():
        for name, run in v.get("runs", {}).items():
            if "loop" not in run:
                continue
            lines += [f"### {name}", "", header, "| --- | --- | ---: | ---: | ---: | ---: | :---: | ---: |"]
            for k, e in sorted(run["loop"]["iterations"].items(), key=lambda kv: int(kv[0])):
                for scale, m in e["scales"].items():
                    score = "-" if m["score"] is None else f"{m['score']:.2f}"
                    div = "-" if m["diversity"] is None else f"{m['diversity']:.3f}"
                    lines.append(
                        f"| {name} | {k}, {'base' if scale == '0' else scale} | {100 * m['count']:.1f} "
                        f"| {100 * m['colour']:.1f} | {100 * m['exact']:.1f} | {score} "
                        f"| {m['wins']}/{m['ties']}/{m['losses']} | {div} |"
                    )
                g = e["gate"]
                if g:
                    lines.append(
                        f"| gate after {k}: {'accepted' if g['accepted'] else 'rejected'} ({g['reason']}) | | | | | | | |"
                    )
                sel = e["selection"]
                lines.append(
                    f"| selection {k}: {sel['pairs']} pairs of {sel['prompts']} prompts; exact candidates "
                    f"{_pct(sel['candidates_exact'])} -> pairs {_pct(sel['pairs_exact'])}; colour "
                    f"{_pct(sel['candidates_colour'])} -> {_pct(sel['pairs_colour'])} | | | | | | | |"
                )
            lines.append("")
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_results(results: dict, path: Path) -> None:
    """proof-results.md: the tables of ``results`` (proof.json as read back), nothing else."""
    lines = [
        "<!-- Generated by `make proof` (python -m experiments.shapes.proof) from proof.json: do not edit by "
        "hand. The protocol and the reading of these numbers are in docs/proof.md. -->",
        "",
        "# Shapes-world proof: the measured results",
        "",
        *_headline(results),
        "",
        *_by_weakness(results),
        "",
        *_per_seed(results),
        "",
        *_checks(results),
        "",
        *_iterations(results),
        "## Time",
        "",
        f"Total {results['minutes']:.1f} min.",
        "",
        *(f"- {stage}: {secs / 60:.1f} min" for stage, secs in results["seconds"].items()),
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def draw_grid(s: Settings, models: list[str], path: Path) -> None:
    """For each target combination (first template), one row per model of the first GRID_SEEDS seeds."""
    from PIL import Image, ImageDraw

    plan = s.plan()
    first = [
        (i, prompt)
        for i, (prompt, _) in enumerate(plan)
        if prompt in set(world.caption(x) for x in s.protocol.target_specs())
    ]
    seeds = list(s.seeds)[:GRID_SEEDS]
    side = world.SIZE * GRID_SCALE
    width = GRID_LABEL_WIDTH + len(seeds) * side
    height = GRID_STRIP + len(first) * (GRID_STRIP + len(models) * side)
    sheet = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(sheet)
    for c, seed in enumerate(seeds):
        pen.text((GRID_LABEL_WIDTH + c * side + 2, 2), f"seed {seed}", fill="black")
    top = GRID_STRIP
    for i, prompt in first:
        pen.text((2, top + 2), prompt, fill="black")
        top += GRID_STRIP
        for model in models:
            pen.text((2, top + side // 2 - 6), model, fill="black")
            for c, seed in enumerate(seeds):
                image = Image.open(measure_final.image_path(s.final_dir(model), i, seed)).convert("RGB")
                sheet.paste(
                    image.resize((side, side), Image.Resampling.NEAREST), (GRID_LABEL_WIDTH + c * side, top)
                )
            top += side
    sheet.save(path)


def write_all(s: Settings, done: dict, seconds: dict, started: float) -> dict:
    results = collect(s, done, seconds, started)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    rows_dir = s.out_dir / ROWS_DIR
    shutil.rmtree(rows_dir, ignore_errors=True)
    for name, out in done.items():
        plan = (
            s.plan() if name != "best-of-10" else [(p, x[: s.protocol.best_of_n_seeds]) for p, x in s.plan()]
        )
        plan = [(p, x) for p, x in plan if any((p, seed) in out["rows"] for seed in x)]
        measure_final.save_rows(out["rows"], rows_dir / f"{name}.jsonl.gz", plan)
    json_path = s.out_dir / "proof.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    write_results(json.loads(json_path.read_text(encoding="utf-8")), s.out_dir / "proof-results.md")
    grid = ["base", task("ccsr", s.loop_seeds[0]), task("control", s.loop_seeds[0]), "ground-truth"]
    draw_grid(s, [m for m in grid if m in done], s.out_dir / "proof-grid.png")
    return results
