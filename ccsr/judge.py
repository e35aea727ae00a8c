"""The judge: a VLM answers the yes/no questions of the question set (``ccsr.questions``) about every image.

``TransformersJudge`` runs LLaVA-Next (a ``roles.Judge``). Its default ``logits`` mode reads the answer from
the next-token probabilities of the Yes/No tokens (``_decide``). The plain way to get those logits is one
forward over every question's full prompt, the image repeated per question (``_full_forward``); with
``judge.prefix_reuse`` (the default) the image is instead encoded once for all questions of an image and its
KV cache shared by them (``ccsr.judge_prefix``, ~8x faster: docs/performance.md). Both give the same answers
and P(yes) to float rounding (``tests/test_judge.py``). The ``generate`` mode decodes free text instead.
Throughput of each path: ``benchmarks/judge.py``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ccsr import judge_prefix
from ccsr.questions import parse_answer
from ccsr.roles import JudgeAnswer

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ccsr.config import Config
    from ccsr.roles import JudgeRequest

logger = logging.getLogger(__name__)

# Used when the processor ships no chat template: the LLaVA-1.6-Mistral conversation format.
LLAVA_MISTRAL_PROMPT = "[INST] <image>\n{question} [/INST]"


def answer_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Single-token spellings of yes and no in this vocabulary ("Yes", "yes", " Yes", "▁yes", "Ġyes", ...)."""
    yes, no = [], []
    for token, idx in tokenizer.get_vocab().items():
        word = token.lstrip(" ▁Ġ").lower()
        if word not in ("yes", "no"):
            continue
        # Confirm by decoding, so merges or byte-level tokens that only look alike are not counted.
        if tokenizer.decode([idx]).strip().lower() != word:
            continue
        (yes if word == "yes" else no).append(idx)
    if not yes or not no:
        raise ValueError("the judge's tokenizer has no single-token 'yes' or 'no'; use judge.mode=generate")
    return sorted(yes), sorted(no)


def llava_prompt(processor: Any, question: str) -> str:
    """One image and one question in the model's chat format (the processor's template when it has one)."""
    # Not a version check: a model folder may ship no chat template, and the attribute is then unset or None.
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return LLAVA_MISTRAL_PROMPT.replace("{question}", question)


class TransformersJudge:
    """LLaVA-Next (``LlavaNextForConditionalGeneration``) answering yes/no questions about images.

    ``suffix_strategy`` and ``image_batch_size`` tune the prefix reuse (``judge_prefix``). ``suffix_strategy``:
    "packed", "batched" or None (packed when the attention implementation is eager or SDPA, which add an
    arbitrary mask to the scores; batched otherwise). ``image_batch_size``: images whose crops go through the
    vision tower in one call. On a 2-core CPU batching gains nothing (tiny v1.6 model: 1 -> 3 images per call
    gave 7.15 -> 7.19 and 7.00 -> 6.69 images/s), so the default keeps memory flat; on a GPU a larger value
    fills the device better."""

    model_keys = ("judge.model",)

    def __init__(self, cfg: Config, *, suffix_strategy: str | None = None, image_batch_size: int = 1):
        import torch
        from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

        from ccsr.devices import torch_device, torch_dtype
        from ccsr.models import resolve_model

        if suffix_strategy not in (None, *judge_prefix.SUFFIX_STRATEGIES):
            raise ValueError(
                f"suffix_strategy must be one of {judge_prefix.SUFFIX_STRATEGIES} or None, "
                f"not {suffix_strategy!r}"
            )
        if image_batch_size < 1:
            raise ValueError(f"image_batch_size must be at least 1, not {image_batch_size}")
        self.mode = cfg.judge.mode
        self.prefix_reuse = cfg.judge.prefix_reuse
        self.max_new_tokens = cfg.judge.max_new_tokens
        self.image_batch_size = image_batch_size
        self.device = torch_device(cfg)
        self.dtype = torch_dtype(cfg)
        path = resolve_model(cfg.judge.model, cfg.model_cache)
        self.processor = LlavaNextProcessor.from_pretrained(
            path, trust_remote_code=cfg.judge.trust_remote_code
        )
        self.tokenizer = self.processor.tokenizer
        # Reloaded tokenizers default to right padding, but batched generation reads the last position, which
        # must be a real token.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        self.model = LlavaNextForConditionalGeneration.from_pretrained(
            path, dtype=self.dtype, trust_remote_code=cfg.judge.trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.image_token_id = self.processor.image_token_id
        self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer) if self.mode == "logits" else ([], [])
        self._yes = torch.tensor(self.yes_ids, device=self.device, dtype=torch.long)
        self._no = torch.tensor(self.no_ids, device=self.device, dtype=torch.long)
        self._answer_ids = torch.cat([self._yes, self._no])
        # None when the config leaves it to the library, whose default is SDPA.
        attn = self.model.config.text_config._attn_implementation or "sdpa"
        self.suffix_strategy = suffix_strategy or ("packed" if attn in ("sdpa", "eager") else "batched")
        # Whether the processor's own encoding is used (ours differs); None until the first image (_encode).
        self._use_processor_encoding: bool | None = None

    # -- prompt encoding --------------------------------------------------------------------------------------

    def build_prompt(self, question: str) -> str:
        return llava_prompt(self.processor, question)

    def _add_special_tokens(self, prompt: str) -> bool:
        # A template that already starts with BOS must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        return not (bos is not None and prompt.startswith(bos))

    def _process_image(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
        """The processed image on the judge's device and its number of image tokens.

        One processor call with a one-image prompt: it preprocesses the image and expands the prompt's image
        token to as many tokens as the image has features, which are counted."""
        text = self.build_prompt("?")
        processed = self.processor(
            images=image, text=text, add_special_tokens=self._add_special_tokens(text), return_tensors="pt"
        )
        image_inputs = {
            "pixel_values": processed["pixel_values"].to(self.device, self.dtype),
            "image_sizes": processed["image_sizes"].to(self.device),
        }
        return image_inputs, int((processed["input_ids"][0] == self.image_token_id).sum())

    def _tokenize(self, questions: list[str]) -> list[list[int]]:
        """The prompts' ids with the image token NOT expanded (~60 ids each, not ~2,950)."""
        prompts = [self.build_prompt(q) for q in questions]
        return self.tokenizer(prompts, add_special_tokens=self._add_special_tokens(prompts[0]))["input_ids"]

    def _encode(
        self, image: Image.Image, questions: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """Token ids of every full prompt (image tokens expanded) and the processed image, preprocessing the
        image once. The first image a judge sees is also encoded by the processor itself; if the two
        encodings ever differ, the judge uses the processor for every question from then on."""
        if self._use_processor_encoding:
            prompts = [self.build_prompt(q) for q in questions]
            add_special = self._add_special_tokens(prompts[0])
            encoded = [self.processor(images=image, text=p, add_special_tokens=add_special) for p in prompts]
            image_inputs, _ = self._process_image(image)
            return [list(e["input_ids"][0]) for e in encoded], image_inputs
        image_inputs, n_image = self._process_image(image)
        # The image token is a special token, tokenized on its own: expanding it after tokenization gives the
        # processor's ids without tokenizing ~2,900 copies of it per question.
        ids = [
            [t for tok in row for t in ([tok] * n_image if tok == self.image_token_id else [tok])]
            for row in self._tokenize(questions)
        ]
        if self._use_processor_encoding is None:
            prompt = self.build_prompt(questions[0])
            reference = self.processor(
                images=image, text=prompt, add_special_tokens=self._add_special_tokens(prompt)
            )
            self._use_processor_encoding = list(reference["input_ids"][0]) != ids[0]
            if self._use_processor_encoding:
                logger.warning("judge: own prompt encoding differs from the processor's; using the processor")
                return self._encode(image, questions)
        return ids, image_inputs

    # -- answering --------------------------------------------------------------------------------------------

    def answer(self, images: list[Image.Image], requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """``requests[i]`` is about ``images[i]``; its rendered questions are what the model is asked."""
        import torch

        if len(images) != len(requests):
            raise ValueError(f"got {len(images)} images but {len(requests)} judge requests")
        images = [image.convert("RGB") for image in images]
        questions = [request.questions for request in requests]
        with torch.inference_mode():
            if self.mode == "logits":
                return self._answer_logits(images, questions)
            return [self._answer_generate(image, qs) for image, qs in zip(images, questions, strict=True)]

    def _answer_logits(self, images: list[Image.Image], questions: list[list[str]]) -> list[JudgeAnswer]:
        """Prefix reuse where it is on and applies (``judge_prefix.suffix_logits``), else the full forward."""
        if self.prefix_reuse:
            logits = judge_prefix.suffix_logits(self, images, questions)
        else:
            logits = [None] * len(images)
        return [
            self._decide(rows if rows is not None else self._full_forward(*self._encode(image, qs)))
            for image, qs, rows in zip(images, questions, logits, strict=True)
        ]

    def _decide(self, logits: torch.Tensor) -> JudgeAnswer:
        """Rows of next-token logits -> answers and P(yes)/(P(yes)+P(no)).

        The decision is the best-scoring single token among the yes/no spellings, so it equals greedy
        decoding's first token whenever that token is one of them. P(yes) sums all spellings; the shared
        softmax normaliser cancels in the ratio, so it is a sigmoid of the log-sum-exp difference."""
        import torch

        logits = logits.float()
        best = self._answer_ids[logits[:, self._answer_ids].argmax(dim=1)]
        is_yes = torch.isin(best, self._yes)
        p_yes = torch.sigmoid(logits[:, self._yes].logsumexp(1) - logits[:, self._no].logsumexp(1))
        return JudgeAnswer(
            answers=["yes" if y else "no" for y in is_yes.tolist()],
            p_yes=[float(p) for p in p_yes.tolist()],
        )

    def _full_inputs(
        self, ids: list[list[int]], image_inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Model inputs of every full prompt: one left-padded row per question, the image repeated per row."""
        import torch

        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        n = len(ids)
        return {
            "input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device),
            "attention_mask": torch.tensor(
                [[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device
            ),
            "pixel_values": image_inputs["pixel_values"].expand(n, *image_inputs["pixel_values"].shape[1:]),
            "image_sizes": image_inputs["image_sizes"].expand(n, -1),
        }

    def _full_forward(self, ids: list[list[int]], image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The plain path, without prefix reuse: next-token logits of every full prompt."""
        return self.model(**self._full_inputs(ids, image_inputs), logits_to_keep=1).logits[:, -1]

    def _answer_generate(self, image: Image.Image, questions: list[str]) -> JudgeAnswer:
        """Free text (greedy, ``judge.max_new_tokens``) parsed by ``parse_answer``: the paper's way, kept for
        models whose yes/no is not a single token or to read what the model actually says."""
        inputs = self._full_inputs(*self._encode(image, questions))
        generated = self.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        width = inputs["input_ids"].shape[1]
        texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        return JudgeAnswer(answers=[parse_answer(t) for t in texts], p_yes=[None] * len(texts))

    def close(self) -> None:
        """Drop the model, processor and tokenizer so their memory can be freed; safe to call again."""
        from ccsr.devices import free_memory

        for name in ("model", "processor", "tokenizer"):
            if hasattr(self, name):  # not a version check: a second close finds them gone
                delattr(self, name)
        free_memory()
