"""The judge: a VLM answers the yes/no questions of the question set (``ccsr.questions``) about every image.

``TransformersJudge`` runs LLaVA-Next. Its default ``logits`` mode reads the answer from the next-token
probabilities of the Yes/No tokens, and encodes each image only once: the image and the prompt text before the
question form a shared prefix whose KV cache is reused by all questions of that image (on the real v1.6
geometry the image is ~2,900 of the ~2,950 tokens of a question, so this saves ~90% of the work). Then every
question's suffix is read from that cache in one forward:

- ``suffix_strategy="packed"`` (eager and SDPA attention): all suffixes in ONE row with a block-diagonal
  causal mask, positions restarting at the prefix length;
- ``suffix_strategy="batched"`` (attention kernels that take no arbitrary mask, e.g. flash attention): one
  row per question over the prefix cache repeated per row.

When the judge's own prompt encoding differs from the processor's, or the image is not in the shared prefix,
it falls back to the full forward of every question (``_full_forward``, also the benchmark's baseline). The
``generate`` mode decodes free text instead. Throughput of each path: ``benchmarks/judge.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ccsr.questions import parse_answer

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ccsr.config import Config

logger = logging.getLogger(__name__)

SUFFIX_STRATEGIES = ("packed", "batched")


@dataclass
class JudgeAnswer:
    """The model's own answers for one image, in question order (the dependency rule is applied by
    ``QuestionSet.score``), and P(yes)/(P(yes)+P(no)) per question in logits mode (None in generate mode)."""

    answers: list[str]
    p_yes: list[float | None]


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
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return LLAVA_MISTRAL_PROMPT.replace("{question}", question)


def cache_argument(model) -> str:
    """The forward keyword of the KV cache: ``cache`` since transformers 5.24 (``past_key_values`` is deprecated
    there and removed in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, under either name (see ``cache_argument``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def packed_suffix_layout(
    lengths: list[int], n_prefix: int, dtype: torch.dtype, device: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position ids [1, S], additive attention mask [1, 1, S, n_prefix + S] and last-token indices [n] of
    suffixes of these lengths packed into one row of S tokens after an ``n_prefix``-token cache.

    Each suffix token sees the whole prefix and the earlier tokens of its own suffix, at the rotary position it
    has in that question's full sequence (restarting at ``n_prefix``). Both the eager and the SDPA kernels add
    the mask to the attention scores. Every tensor is built on ``device`` (counts included: a CPU count
    tensor beside CUDA ones fails), and the packed length is passed to ``repeat_interleave`` from the host, so
    a CUDA layout needs no device-to-host sync to size its output."""
    import torch

    total = sum(lengths)
    counts = torch.tensor(lengths, dtype=torch.long, device=device)
    seq = torch.repeat_interleave(counts, output_size=total)  # the suffix each packed token belongs to
    starts = counts.cumsum(0) - counts
    local = torch.arange(total, device=device) - starts[seq]
    allowed = (seq[:, None] == seq[None, :]) & (local[None, :] <= local[:, None])
    mask = torch.zeros(total, n_prefix + total, dtype=dtype, device=device)
    mask[:, n_prefix:].masked_fill_(~allowed, torch.finfo(dtype).min)
    return (local + n_prefix)[None], mask[None, None], starts + counts - 1


class PrefixPlan(NamedTuple):
    """One image's questions split for prefix reuse."""

    prefix: torch.Tensor  # [1, P] ids shared by every prompt, the image token expanded
    suffixes: list[list[int]]  # each question's remaining ids (at least one)
    # The processed image: pixel_values [1, crops, 3, H, W] and image_sizes [1, 2].
    image_inputs: dict[str, torch.Tensor]


class TransformersJudge:
    """LLaVA-Next (``LlavaNextForConditionalGeneration``) answering yes/no questions about images.

    ``suffix_strategy``: "packed", "batched" or None (packed when the attention implementation is eager or
    SDPA, which add an arbitrary mask to the scores; batched otherwise). ``image_batch_size``: images whose
    crops go through the vision tower in one call. On a 2-core CPU batching gains nothing (tiny v1.6 model:
    1 -> 3 images per call gave 7.15 -> 7.19 and 7.00 -> 6.69 images/s), so the default keeps memory flat; on a
    GPU a larger value fills the device better."""

    def __init__(self, cfg: Config, *, suffix_strategy: str | None = None, image_batch_size: int = 1):
        import torch
        from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

        from ccsr.devices import torch_device, torch_dtype
        from ccsr.models import resolve_model

        if suffix_strategy not in (None, *SUFFIX_STRATEGIES):
            raise ValueError(
                f"suffix_strategy must be one of {SUFFIX_STRATEGIES} or None, not {suffix_strategy!r}"
            )
        if image_batch_size < 1:
            raise ValueError(f"image_batch_size must be at least 1, not {image_batch_size}")
        self.mode = cfg.judge.mode
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
        self._cache_arg = cache_argument(self.model)
        self.image_token_id = self.processor.image_token_id
        self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer) if self.mode == "logits" else ([], [])
        self._yes = torch.tensor(self.yes_ids, device=self.device, dtype=torch.long)
        self._no = torch.tensor(self.no_ids, device=self.device, dtype=torch.long)
        self._answer_ids = torch.cat([self._yes, self._no])
        attn = getattr(self.model.config.text_config, "_attn_implementation", None) or "sdpa"
        self.suffix_strategy = suffix_strategy or ("packed" if attn in ("sdpa", "eager") else "batched")
        # Whether the processor's own encoding is used (ours differs); None until the first image (see _encode).
        self._use_processor_encoding: bool | None = None
        # transformers 5 installs its hidden-state capturing hooks on the vision layers at the tower's first
        # forward; run one stock forward now so that they exist on every layer before _image_features runs the
        # tower with a shortened layer list (otherwise the stock path later misses the last layer's output).
        size = getattr(self.model.config.vision_config, "image_size", 336)
        with torch.inference_mode():
            self.model.model.vision_tower(
                torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype), output_hidden_states=True
            )

    # -- prompt encoding --------------------------------------------------------------------------------------

    def build_prompt(self, question: str) -> str:
        return llava_prompt(self.processor, question)

    def _add_special_tokens(self, prompt: str) -> bool:
        # A template that already starts with BOS must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        return not (bos is not None and prompt.startswith(bos))

    def _process_image(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
        """The processed image on the judge's device and its number of image tokens."""
        pixels = self.processor.image_processor(image, return_tensors="pt")
        image_inputs = {
            "pixel_values": pixels["pixel_values"].to(self.device, self.dtype),
            "image_sizes": pixels["image_sizes"].to(self.device),
        }
        return image_inputs, self._image_token_count(image, pixels["image_sizes"])

    def _image_token_count(self, image: Image.Image, image_sizes: torch.Tensor) -> int:
        if hasattr(self.processor, "_get_num_multimodal_tokens"):
            counts = self.processor._get_num_multimodal_tokens(image_sizes=image_sizes.tolist())
            return int(counts["num_image_tokens"][0])
        # A processor without that helper: count the image tokens in its own output.
        text = self.build_prompt("?")
        ids = self.processor(images=image, text=text, add_special_tokens=self._add_special_tokens(text))
        return list(ids["input_ids"][0]).count(self.image_token_id)

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

    def _plan(self, image: Image.Image, questions: list[str]) -> PrefixPlan | None:
        """The shared prefix, each question's suffix and the processed image; None when prefix reuse does not
        apply (the processor's own encoding is in use, or the image is not in the shared prefix).

        The prefix is every token common to all prompts (chat header + image + ...), but at least one suffix
        token per question so each one has its own last position. It is found on the prompts' ids BEFORE the
        image token is expanded (checked against the processor on the first image by ``_encode``). Suffixes
        are slices of each full tokenization, never separate tokenizations (tokens can merge across the
        boundary)."""
        import torch

        if self._use_processor_encoding is None:
            self._encode(image, questions[:1])  # decides once whether our own encoding is exact
        if self._use_processor_encoding:
            return None
        rows = self._tokenize(questions)
        first = rows[0]
        n_prefix = min(len(x) for x in rows) - 1
        for x in rows[1:]:
            n_prefix = next((j for j in range(n_prefix) if first[j] != x[j]), n_prefix)
        if self.image_token_id not in first[:n_prefix] or first.count(self.image_token_id) != 1:
            return None
        image_inputs, n_image = self._process_image(image)
        k = first.index(self.image_token_id)
        prefix = first[:k] + [self.image_token_id] * n_image + first[k + 1 : n_prefix]
        return PrefixPlan(
            torch.tensor([prefix], device=self.device), [x[n_prefix:] for x in rows], image_inputs
        )

    # -- answering --------------------------------------------------------------------------------------------

    def answer(self, images: list[Image.Image], questions: list[list[str]]) -> list[JudgeAnswer]:
        """``questions[i]`` are the rendered questions for ``images[i]``."""
        import torch

        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} question lists")
        images = [image.convert("RGB") for image in images]
        with torch.inference_mode():
            if self.mode == "logits":
                return self._answer_logits(images, questions)
            return [self._answer_generate(image, qs) for image, qs in zip(images, questions, strict=True)]

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

    def _answer_logits(self, images: list[Image.Image], questions: list[list[str]]) -> list[JudgeAnswer]:
        """Prefix reuse where it applies, the full forward elsewhere. The vision tower runs over the crops of
        ``image_batch_size`` images per call; then each image gets one prefix and one suffix forward."""
        import torch

        plans = [self._plan(image, qs) for image, qs in zip(images, questions, strict=True)]
        out: list[JudgeAnswer | None] = [None] * len(images)
        for i, plan in enumerate(plans):
            if plan is None:
                out[i] = self._decide(self._full_forward(*self._encode(images[i], questions[i])))
        todo = [i for i, plan in enumerate(plans) if plan is not None]
        for start in range(0, len(todo), self.image_batch_size):
            group = todo[start : start + self.image_batch_size]
            # The crops of all images of the group as one [sum crops, 3, H, W] batch: the model splits them back
            # by image_sizes. A single image is passed as a view (no copy of its ~7 MB of pixels).
            crops = [plans[i].image_inputs["pixel_values"][0] for i in group]
            pixel_values = crops[0] if len(crops) == 1 else torch.cat(crops)
            image_sizes = torch.cat([plans[i].image_inputs["image_sizes"] for i in group])
            for i, feature in zip(group, self._image_features(pixel_values, image_sizes), strict=True):
                out[i] = self._decide(self._suffix_logits(plans[i], feature))
        return out  # type: ignore[return-value]

    def _image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Projected, packed (unpadded + newline) image features, one [n_image_tokens, hidden] per image.

        LLaVA reads the vision tower's hidden state at ``vision_feature_layer`` (-2: the penultimate layer,
        Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"), so the layers after it are computed
        and thrown away by the stock forward (1 of 24 in CLIP ViT-L/14-336; 1 of 2 in the tiny model). They are
        skipped here, as vLLM does, by running the tower with its layer list cut after the layer that is read.
        """
        import torch

        layer = self.model.config.vision_feature_layer
        tower = self.model.model.vision_tower
        # transformers 5 flattens CLIPVisionModel (tower.encoder); 4.x nests it (tower.vision_model.encoder).
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        layers = getattr(encoder, "layers", None)
        # hidden_states[0] is the embedding output and hidden_states[k] the output of layer k.
        n_keep = (
            (len(layers) + 1 + layer if layer < 0 else layer) if isinstance(layer, int) and layers else None
        )
        if n_keep is None or not 0 < n_keep <= len(layers):
            features = self.model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
        else:
            encoder.layers = torch.nn.ModuleList(layers[:n_keep])
            try:
                features = self.model.model.get_image_features(
                    pixel_values=pixel_values, image_sizes=image_sizes, vision_feature_layer=n_keep
                )
            finally:
                encoder.layers = layers
        features = getattr(features, "pooler_output", features)  # an output object in transformers >= 5
        if isinstance(features, tuple) and len(features) == 2 and not isinstance(features[1], torch.Tensor):
            features = features[0]
        return list(features)

    def _suffix_logits(self, plan: PrefixPlan, feature: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every question's last token: the prefix once, then all suffixes over its cache."""
        import torch

        embeds = self.model.get_input_embeddings()(plan.prefix)
        is_image = (plan.prefix == self.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(is_image, feature.to(embeds.dtype))
        # The all-ones 2-D mask makes the model build its causal mask under every attention implementation.
        cache = output_cache(
            self.model(
                inputs_embeds=embeds,
                attention_mask=torch.ones_like(plan.prefix),
                use_cache=True,
                logits_to_keep=1,
            )
        )
        n_prefix = plan.prefix.shape[1]
        if self.suffix_strategy == "packed":
            return self._packed_suffix_forward(cache, n_prefix, plan.suffixes)
        return self._batched_suffix_forward(cache, n_prefix, plan.suffixes)

    def _packed_suffix_forward(self, cache: Any, n_prefix: int, suffixes: list[list[int]]) -> torch.Tensor:
        """All suffixes in ONE row after the batch-1 prefix cache (``packed_suffix_layout``); no copy of the
        cache is made."""
        import torch

        position_ids, mask, ends = packed_suffix_layout(
            [len(s) for s in suffixes], n_prefix, self.dtype, self.device
        )
        out = self.model(
            input_ids=torch.tensor([[t for s in suffixes for t in s]], device=self.device),
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_arg: cache},
            logits_to_keep=ends,
        )
        return out.logits[0]

    def _batched_suffix_forward(self, cache: Any, n_prefix: int, suffixes: list[list[int]]) -> torch.Tensor:
        """One right-padded row per question over the prefix cache repeated per row. The mask must span prefix
        and suffix: a suffix-only mask is accepted without error and gives wrong answers."""
        import torch

        lengths = [len(s) for s in suffixes]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id
        rows = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=self.device)
        mask = torch.tensor([[1] * (n_prefix + n) + [0] * (width - n) for n in lengths], device=self.device)
        cache.batch_repeat_interleave(len(suffixes))  # in place
        out = self.model(input_ids=rows, attention_mask=mask, use_cache=True, **{self._cache_arg: cache})
        ends = torch.tensor(lengths, device=self.device) - 1
        return out.logits[torch.arange(len(suffixes), device=self.device), ends]

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
        """Reference path without prefix reuse: next-token logits of every full prompt."""
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
        from ccsr.devices import free_memory

        for name in ("model", "processor", "tokenizer"):
            if hasattr(self, name):
                delattr(self, name)
        free_memory()
