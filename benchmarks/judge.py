"""Judge throughput: prefix reuse against the two obvious ways of asking 10 questions about an image.

Runs on a tiny LLaVA-Next built with the real llava-v1.6 geometry (336 px crops, patch 14, grids up to
672x672), so that, as in the real model, a 512-768 px image is ~2,200-2,900 of the ~2,950 tokens of a prompt
and the cost is dominated by the image part of the sequence.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

N_IMAGES = 6
CLASS_NAME = "giraffe"
PROMPT = "A tall giraffe standing in the savanna at sunset, golden hour light, 85mm lens."


def _images(n: int, seed: int = 7):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        w, h = (int(x) for x in rng.integers(512, 769, size=2))
        pixels = rng.uniform(0, 255, size=3) + rng.normal(0, rng.uniform(10, 80), size=(h, w, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")))
    return images


def _per_question_generate(judge, image, request):
    """(a) One short greedy ``generate`` call per question, as the paper's scripts do."""
    from ccsr.questions import parse_answer
    from ccsr.roles import JudgeAnswer

    answers = []
    for question in request.questions:
        prompt = judge.build_prompt(question)
        inputs = judge.processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
        out = judge.model.generate(
            **inputs, do_sample=False, max_new_tokens=4, pad_token_id=judge.tokenizer.pad_token_id
        )
        n = inputs["input_ids"].shape[1]
        answers.append(parse_answer(judge.tokenizer.decode(out[0, n:], skip_special_tokens=True)))
    return JudgeAnswer(answers=answers, p_yes=[None] * len(answers))


def _batched_full(judge, image, request):
    """(b) One batched forward over the 10 full sequences (image encoded and attended 10 times): the judge's
    plain path, what ``judge.prefix_reuse: false`` runs."""
    ids, image_inputs = judge._encode(image, request.questions)
    return judge._decide(judge._full_forward(ids, image_inputs))


def _prefix_reuse(judge, image, request):
    """(c) The judge's default path: the image prefix once, the 10 question suffixes over its KV cache."""
    return judge.answer([image], [request])[0]


def _timed(paths: dict, images, request) -> dict[str, tuple[float, list]]:
    """Images per second and answers of each path. The paths take turns image by image, so that a change of the
    (shared, noisy) machine's load during the run falls on all of them alike: the ratios are what carry over."""
    import torch

    elapsed = dict.fromkeys(paths, 0.0)
    results: dict[str, list] = {name: [] for name in paths}
    with torch.inference_mode():
        for fn in paths.values():
            fn(images[0], request)  # warm-up: the first call is several times slower
        for image in images:
            for name, fn in paths.items():
                start = time.perf_counter()
                results[name].append(fn(image, request))
                elapsed[name] += time.perf_counter() - start
    return {name: (len(images) / elapsed[name], results[name]) for name in paths}


def _timed_batch(judge, images, request) -> tuple[float, list]:
    """Prefix reuse over all images in one ``answer`` call (``judge.image_batch_size`` images per vision-tower
    call)."""
    k = judge.image_batch_size
    judge.answer(images[:k], [request] * k)  # warm-up
    start = time.perf_counter()
    results = judge.answer(images, [request] * len(images))
    elapsed = time.perf_counter() - start
    return len(images) / elapsed, results


def bench_judge(n_images: int = N_IMAGES, image_batch_sizes: tuple[int, ...] = (3,)) -> dict:
    """Images per second of (a) per-question generate, (b) batched full sequences, (c) prefix reuse one image
    at a time, and (d) prefix reuse with the vision tower batched over ``image_batch_sizes`` images."""
    from ccsr.config import Config
    from ccsr.config_files import resolve_data_path
    from ccsr.judge import TransformersJudge
    from ccsr.questions import QuestionSet
    from ccsr.roles import JudgeRequest
    from ccsr.tiny.llava import build_llava_next

    questions = QuestionSet.load(resolve_data_path("prompts/questions.yaml"))
    request = JudgeRequest.rendered(questions, CLASS_NAME, PROMPT)
    images = [im.convert("RGB") for im in _images(n_images)]
    with tempfile.TemporaryDirectory(prefix="ccsr-bench-judge-") as tmp:
        build_llava_next(Path(tmp), seed=0, geometry="v1.6")
        cfg = Config(device="cpu")
        cfg.judge.model = tmp
        judge = TransformersJudge(cfg)
        try:
            n_tokens = judge._encode(images[0], request.questions[:1])[0][0].count(judge.image_token_id)
            paths = {
                "generate": lambda im, qs: _per_question_generate(judge, im, qs),
                "batched": lambda im, qs: _batched_full(judge, im, qs),
                "fast": lambda im, qs: _prefix_reuse(judge, im, qs),
            }
            timed = _timed(paths, images, request)
            (rate_generate, generated), (rate_batched, batched), (rate_fast, fast) = timed.values()
        finally:
            judge.close()
        image_batched = {}
        for k in image_batch_sizes:
            grouped = TransformersJudge(cfg, image_batch_size=k)
            try:
                image_batched[k] = _timed_batch(grouped, images, request)
            finally:
                grouped.close()
    identical = all(
        a.answers == b.answers == c.answers for a, b, c in zip(generated, batched, fast, strict=True)
    ) and all(
        r.answers == c.answers for _, rs in image_batched.values() for r, c in zip(rs, fast, strict=True)
    )
    max_p_diff = max(
        abs(p - q) for b, c in zip(batched, fast, strict=True) for p, q in zip(b.p_yes, c.p_yes, strict=True)
    )
    return {
        "images_per_s": {
            "generate_per_question": round(rate_generate, 3),
            "batched_full_sequences": round(rate_batched, 3),
            "prefix_reuse": round(rate_fast, 3),
            **{f"prefix_reuse_{k}_images_per_call": round(r, 3) for k, (r, _) in image_batched.items()},
        },
        "speedup_vs_generate": round(rate_fast / rate_generate, 2),
        "speedup_vs_batched": round(rate_fast / rate_batched, 2),
        "answers_identical": identical,
        "max_p_yes_diff_vs_batched": max_p_diff,
        "image_tokens_first_image": n_tokens,
        "n_images": n_images,
    }
