"""Calibrate the shapes world before a proof: how often does the base model draw what a prompt asks for?

The loop's premise is a weakness that best-of-ten can reach: the base must draw the targeted binding (purple
circles) right in roughly 15-35% of samples, and everything else well, or the measurement says nothing. This
script measures, on a trained base model, per group of prompts and per guidance scale:

- the share of images whose measured colour, count and background match the prompt (``world.accuracy``);
- the share in which every measured object has the prompt's colour, whatever its shape (``any_shape_colour``),
  which separates "drew the wrong colour" from "drew a shape the measurement does not recognise";
- how well the measurement reads the VAE's round trip of rendered scenes (ground truth known), per class.

It also writes a labelled grid of the base's own images, to be looked at.

    python -m experiments.shapes.calibrate --base-model .cache/ccsr-tiny/shapes-sd-v6 --guidance 2 4 6
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import numpy as np

from experiments.shapes import world

TARGET = ("circle", "purple")


def prompt_groups(shape: str = TARGET[0], colour: str = TARGET[1]) -> dict[str, list[world.SceneSpec]]:
    """The prompt groups measured: the target binding (held-out and loop combinations), the class's other
    colours, and the target colour on the other classes."""
    held = [s for s in world.validation_specs(shape) if s.colour == colour]
    loop = [s for s in world.training_specs(shape) if s.colour == colour]
    others = [s for s in world.validation_specs(shape) if s.colour != colour]
    other_classes = [
        s for c in world.CLASSES if c != shape for s in world.validation_specs(c) if s.colour == colour
    ]
    return {
        f"{colour} {shape}, held-out": held,
        f"{colour} {shape}, loop prompts": loop,
        f"other colours of {shape}, held-out": others,
        f"{colour} on other classes, held-out": other_classes,
    }


def any_shape_colour(spec: world.SceneSpec, m: world.Measurement) -> bool:
    """At least one object and every measured object in the prompt's colour (shape not asked)."""
    return bool(m.objects) and all(o.colour == spec.colour for o in m.objects)


def measure_images(specs: list[world.SceneSpec], images) -> dict[str, float]:
    rows = []
    for spec, image in zip(specs, images, strict=True):
        m = world.measure(image)
        acc = world.accuracy(spec, m)
        rows.append((acc.colour, acc.count, acc.background, acc.shape, any_shape_colour(spec, m)))
    values = np.asarray(rows, dtype=np.float64).mean(0)
    names = ("colour", "count", "background", "class_seen", "any_shape_colour")
    return {n: round(100 * float(v), 1) for n, v in zip(names, values, strict=True)} | {"images": len(rows)}


def vae_round_trip(model_dir: Path, n: int = 40) -> dict[str, dict[str, float]]:
    """The measurement on the VAE's reconstruction of rendered scenes, where the truth is known, per class."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
    rng = random.Random("calibrate-vae")
    out = {}
    for shape in world.CLASSES:
        specs = [rng.choice(world.all_specs(shape)) for _ in range(n)]
        renders = [world.render(s, world.place_objects(s, rng)) for s in specs]
        x = torch.from_numpy(np.stack([np.asarray(r) for r in renders])).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            y = vae.decode(vae.encode(x / 127.5 - 1).latent_dist.mean).sample
        arrays = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        out[shape] = measure_images(specs, [Image.fromarray(a) for a in arrays])
    return out


def draw(model_dir: Path, specs: list[world.SceneSpec], seeds: list[int], guidance: float, steps: int = 20):
    """One image per (spec, seed), first template, with the pipeline the loop uses."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    jobs = [(s, seed) for s in specs for seed in seeds]
    images = []
    for start in range(0, len(jobs), 32):
        chunk = jobs[start : start + 32]
        with torch.inference_mode():
            images += pipe(
                [world.caption(s) for s, _ in chunk],
                height=world.SIZE,
                width=world.SIZE,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
            ).images
    return [s for s, _ in jobs], images


def grid(rows: list[tuple[str, list]], path: Path, scale: int = 2) -> None:
    """Rows of images with a label above each row."""
    from PIL import Image, ImageDraw

    side = world.SIZE * scale
    width = max(len(images) for _, images in rows) * side
    sheet = Image.new("RGB", (width, len(rows) * (side + 14)), "white")
    pen = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        top = r * (side + 14)
        pen.text((2, top + 1), label, fill="black")
        for i, image in enumerate(images):
            sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (i * side, top + 14))
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.shapes.calibrate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    parser.add_argument(
        "--seeds", type=int, default=16, help="seeds per prompt (from 900, never a proof seed)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/calibrate"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(900, 900 + args.seeds))
    report: dict = {"vae_round_trip": vae_round_trip(args.base_model)}
    for g in args.guidance:
        for name, specs in prompt_groups().items():
            asked, images = draw(args.base_model, specs, seeds, g)
            report[f"guidance {g:g}: {name}"] = measure_images(asked, images)
            if name == f"{TARGET[1]} {TARGET[0]}, held-out":
                rows = [
                    (f"{world.caption(s)} (guidance {g:g})", images[i * len(seeds) : i * len(seeds) + 12])
                    for i, s in enumerate(specs)
                ]
                grid(rows, args.out / f"grid-target-g{g:g}.png")
            if name.startswith("other colours"):
                rows = [
                    (world.caption(s), images[i * len(seeds) : i * len(seeds) + 12])
                    for i, s in enumerate(specs[:6])
                ]
                grid(rows, args.out / f"grid-others-g{g:g}.png")
        print(json.dumps({k: v for k, v in report.items() if k.startswith(f"guidance {g:g}")}, indent=1))
    print(json.dumps(report["vae_round_trip"], indent=1))
    (args.out / "calibration.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
