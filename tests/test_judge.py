"""The LLaVA-Next judge on the real tiny model: the fast prefix-reuse path against plain greedy decoding."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ccsr.config import Config
from ccsr.config_files import resolve_data_path
from ccsr.judge import TransformersJudge, answer_token_ids
from ccsr.judge_prefix import packed_suffix_layout
from ccsr.questions import QuestionSet
from ccsr.roles import JudgeAnswer, JudgeRequest

N_IMAGES = 20


@pytest.fixture(scope="session")
def llava_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tiny-models"))


def _config(cache: str, **judge) -> Config:
    cfg = Config(device="cpu", model_cache=cache)
    for key, value in judge.items():
        setattr(cfg.judge, key, value)
    return cfg


@pytest.fixture(scope="session")
def judge(llava_cache):
    j = TransformersJudge(_config(llava_cache))
    yield j
    j.close()


@pytest.fixture(scope="session")
def question_set() -> QuestionSet:
    return QuestionSet.load(resolve_data_path("prompts/questions.yaml"))


def noise_images(n: int, seed: int = 123) -> list[Image.Image]:
    """Random noise of varied sizes and aspect ratios (hitting every grid pinpoint) and brightness."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        w, h = (int(x) for x in rng.integers(16, 160, size=2))
        pixels = rng.uniform(0, 255, size=3) + rng.normal(0, rng.uniform(5, 90), size=(h, w, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")))
    return images


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return noise_images(N_IMAGES)


@pytest.fixture(scope="session")
def requests(question_set) -> list[JudgeRequest]:
    prompts = [f"A photo of a giraffe number {i} {{class_name}} in the savanna" for i in range(N_IMAGES)]
    return [JudgeRequest.rendered(question_set, "giraffe", p) for p in prompts]


@pytest.fixture(scope="session")
def rendered(requests) -> list[list[str]]:
    return [r.questions for r in requests]


@pytest.fixture(scope="session")
def fast_answers(judge, images, requests) -> list[JudgeAnswer]:
    return judge.answer(images, requests)


def _p_yes(judge, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits[..., judge.yes_ids].logsumexp(-1) - logits[..., judge.no_ids].logsumexp(-1))


def _reference(judge, image, question):
    """The unbatched, uncached reference: the processor's own encoding and one plain forward."""
    prompt = judge.build_prompt(question)
    inputs = judge.processor(
        images=image.convert("RGB"), text=prompt, add_special_tokens=False, return_tensors="pt"
    )
    with torch.inference_mode():
        logits = judge.model(**inputs).logits[0, -1]
    return inputs, int(logits.argmax()), _p_yes(judge, logits).item()


def _reference_batch(judge, image, questions):
    """All questions of one image as full left-padded sequences (no prefix reuse), the processor's encoding."""
    prompts = [judge.build_prompt(q) for q in questions]
    inputs = judge.processor(
        images=[image.convert("RGB")] * len(prompts),
        text=prompts,
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        logits = judge.model(**inputs).logits[:, -1]
    return logits.argmax(-1).tolist(), _p_yes(judge, logits).tolist()


def test_yes_no_tokens(judge):
    yes, no = answer_token_ids(judge.tokenizer)
    to_tokens = judge.tokenizer.convert_ids_to_tokens
    assert {"▁Yes", "Yes", "▁yes", "yes"} <= set(to_tokens(yes))
    assert {"▁No", "No", "▁no", "no"} <= set(to_tokens(no))


def _check(judge, greedy: int, p_ref: float, answer: str, p: float) -> int:
    assert p == pytest.approx(p_ref, abs=1e-4)
    if greedy in judge.yes_ids or greedy in judge.no_ids:
        assert answer == ("yes" if greedy in judge.yes_ids else "no")
        return 1
    return 0


def test_fast_path_equals_greedy_first_token(judge, images, rendered, fast_answers):
    decided = 0
    for image, questions, fast in zip(images, rendered, fast_answers, strict=True):
        assert len(fast.answers) == len(fast.p_yes) == 10
        greedy, p_ref = _reference_batch(judge, image, questions)
        for k in range(10):
            decided += _check(judge, greedy[k], p_ref[k], fast.answers[k], fast.p_yes[k])
    # The tiny model is built to answer with a yes/no token essentially always.
    assert decided >= 0.95 * N_IMAGES * 10


def test_fast_path_equals_unbatched_single_question(judge, images, rendered, fast_answers):
    for image, questions, fast in list(zip(images, rendered, fast_answers, strict=True))[:4]:
        for k, question in enumerate(questions):
            _, greedy, p_ref = _reference(judge, image, question)
            _check(judge, greedy, p_ref, fast.answers[k], fast.p_yes[k])


def test_greedy_generate_first_token(judge, images, rendered, fast_answers):
    # generate() itself (not only the argmax of one forward) for a few images.
    for image, questions, fast in list(zip(images, rendered, fast_answers, strict=True))[:3]:
        for question, answer in zip(questions[:4], fast.answers[:4], strict=True):
            inputs, _, _ = _reference(judge, image, question)
            with torch.inference_mode():
                out = judge.model.generate(**inputs, do_sample=False, max_new_tokens=1)
            first = int(out[0, -1])
            assert first in judge.yes_ids + judge.no_ids
            assert answer == ("yes" if first in judge.yes_ids else "no")


def test_answers_vary_between_images(fast_answers, question_set):
    flat = [a for r in fast_answers for a in r.answers]
    assert 0.1 < flat.count("yes") / len(flat) < 0.9
    assert len({question_set.score(r.answers) for r in fast_answers}) >= 2


def _agree(answers: list[JudgeAnswer], reference: list[JudgeAnswer]) -> None:
    assert len(answers) == len(reference)
    for a, b in zip(answers, reference, strict=True):
        assert a.answers == b.answers
        assert a.p_yes == pytest.approx(b.p_yes, abs=1e-5)


def test_the_kv_cache_goes_under_the_installed_name(judge, images, requests):
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name warns, and goes in
    5.40): the fast path uses the installed version's name (``compat.kv_cache_name``), so it warns about
    neither."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        judge.answer(images[:1], requests[:1])
    stale = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not stale, stale


def test_packed_path_is_the_default(judge):
    # The tiny model runs SDPA, which adds an arbitrary mask to the scores: all suffixes go in one row.
    assert judge.suffix_strategy == "packed"
    assert judge.image_batch_size == 1


def test_packed_suffix_layout():
    positions, mask, ends = packed_suffix_layout([2, 1, 3], n_prefix=4, dtype=torch.float32, device="cpu")
    assert positions.tolist() == [[4, 5, 4, 4, 5, 6]]
    assert ends.tolist() == [1, 2, 5]
    # Every suffix token sees the whole prefix, and its own suffix up to itself.
    own = [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    own += [[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    seen = (mask[0, 0] == 0).int().tolist()
    assert seen == [[1] * 4 + row for row in own]
    assert mask.shape == (1, 1, 6, 10)
    assert mask.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_suffix_layout_stays_on_the_given_device(dtype):
    """On the meta device (data-free, like CUDA a device other than the CPU's) any tensor built on the CPU by
    mistake and combined with the others raises; the mask takes the model's dtype, the indices are long."""
    positions, mask, ends = packed_suffix_layout(
        [2, 1, 3], n_prefix=4, dtype=dtype, device=torch.device("meta")
    )
    assert {t.device.type for t in (positions, mask, ends)} == {"meta"}
    assert (positions.shape, mask.shape, ends.shape) == ((1, 6), (1, 1, 6, 10), (3,))
    assert (positions.dtype, mask.dtype, ends.dtype) == (torch.long, dtype, torch.long)


def test_constructor_refuses_unknown_strategy(llava_cache):
    with pytest.raises(ValueError, match="suffix_strategy"):
        TransformersJudge(_config(llava_cache), suffix_strategy="flash")
    with pytest.raises(ValueError, match="image_batch_size"):
        TransformersJudge(_config(llava_cache), image_batch_size=0)


def test_batched_suffix_strategy_agrees(llava_cache, images, requests, fast_answers):
    # One row per question over the repeated prefix cache (for attention kernels that take no arbitrary mask).
    judge = TransformersJudge(_config(llava_cache), suffix_strategy="batched")
    try:
        _agree(judge.answer(images[:5], requests[:5]), fast_answers[:5])
    finally:
        judge.close()


def test_full_forward_agrees(judge, images, rendered, fast_answers):
    # The reference path without prefix reuse (the fallback when the processor's encoding must be used).
    with torch.inference_mode():
        full = [
            judge._decide(judge._full_forward(*judge._encode(image, questions)))
            for image, questions in zip(images[:3], rendered[:3], strict=True)
        ]
    _agree(full, fast_answers[:3])


def test_plain_path_agrees(llava_cache, images, requests, fast_answers):
    # judge.prefix_reuse: false answers every image with the full forward: the same answers and P(yes).
    judge = TransformersJudge(_config(llava_cache, prefix_reuse=False))
    try:
        _agree(judge.answer(images[:6], requests[:6]), fast_answers[:6])
    finally:
        judge.close()


def test_image_token_count_is_the_processors(judge, images, rendered):
    # The judge expands the image token itself; its ids must be the processor's own for every image size.
    for image, questions in zip(images, rendered, strict=True):
        ids, _ = judge._encode(image.convert("RGB"), questions[:1])
        prompt = judge.build_prompt(questions[0])
        reference = judge.processor(
            images=image.convert("RGB"), text=prompt, add_special_tokens=judge._add_special_tokens(prompt)
        )
        assert ids[0] == list(reference["input_ids"][0])
    assert judge._use_processor_encoding is False  # the judge's own encoding was in use throughout


def test_eager_attention_agrees(llava_cache, images, requests, fast_answers):
    # The prefix forward and the packed mask are causal under eager attention too, not only under SDPA.
    judge = TransformersJudge(_config(llava_cache))
    try:
        judge.model.set_attn_implementation("eager")
        assert judge.model.config.text_config._attn_implementation == "eager"
        _agree(judge.answer(images[:4], requests[:4]), fast_answers[:4])
    finally:
        judge.close()


def test_image_batching_agrees(llava_cache, images, requests, fast_answers):
    # Several images' crops in one vision-tower call (sizes differ, so crop counts differ) give the same answers.
    judge = TransformersJudge(_config(llava_cache), image_batch_size=4)
    try:
        _agree(judge.answer(images[:6], requests[:6]), fast_answers[:6])
    finally:
        judge.close()


def test_generate_mode(llava_cache, images, requests, fast_answers):
    judge = TransformersJudge(_config(llava_cache, mode="generate"))
    try:
        out = judge.answer(images[:4], requests[:4])
    finally:
        judge.close()
    for free, fast in zip(out, fast_answers[:4], strict=False):
        assert free.p_yes == [None] * 10
        assert free.answers == fast.answers  # the tiny model says "Yes</s>" / "No</s>"


def test_answer_checks_lengths(judge, images, requests):
    with pytest.raises(ValueError, match="2 images but 1 judge requests"):
        judge.answer(images[:2], requests[:1])


def test_close_drops_the_model_and_may_be_called_again(llava_cache):
    judge = TransformersJudge(_config(llava_cache))
    judge.close()
    assert not any(hasattr(judge, name) for name in ("model", "processor", "tokenizer"))
    judge.close()  # the loop's error paths may close a judge twice


class _Engine:
    """Stands in for a vLLM engine to count shutdowns (vLLM itself is a GPU-box extra)."""

    def __init__(self):
        self.shutdowns = 0

    def shutdown(self):
        self.shutdowns += 1


def test_vllm_close_shuts_the_engine_down_once(monkeypatch):
    """LLM.shutdown where vLLM has it, else the V1 engine client's; references dropped, a second close a no-op."""
    from types import SimpleNamespace

    from ccsr.judge_vllm import VLLMJudge
    from ccsr.prompter_vllm import VLLMPrompter

    monkeypatch.setitem(sys.modules, "vllm", None)  # importing vLLM fails, as where it is not installed
    for cls in (VLLMJudge, VLLMPrompter):
        core = _Engine()
        backend = cls.__new__(cls)  # no engine is built
        backend.llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=core))
        backend.close()
        backend.close()
        assert core.shutdowns == 1 and not hasattr(backend, "llm")
        backend.llm = llm = _Engine()
        backend.close()
        assert llm.shutdowns == 1 and not hasattr(backend, "llm")
    judge = VLLMJudge.__new__(VLLMJudge)
    judge.llm, judge.processor, judge.params = _Engine(), object(), object()
    judge.close()
    assert not any(hasattr(judge, name) for name in ("llm", "processor", "params"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (GPU extra)")
def test_vllm_judge_matches_transformers(llava_cache, images, requests, fast_answers):
    from ccsr.judge_vllm import VLLMJudge

    judge = VLLMJudge(_config(llava_cache, backend="vllm"))
    try:
        out = judge.answer(images[:4], requests[:4])
    finally:
        judge.close()
    for a, b in zip(out, fast_answers[:4], strict=False):
        assert len(a.answers) == 10
        assert a.p_yes == pytest.approx(b.p_yes, abs=2e-2)
