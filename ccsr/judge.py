"""The judge: a VLM answers the yes/no questions of the question set (``ccsr.questions``) about every image.

``TransformersJudge`` runs LLaVA-Next. Its default ``logits`` mode reads the answer from the next-token
probabilities of the Yes/No tokens, and encodes each image only once per image: the image and the prompt text
before the question form a shared prefix whose KV cache is reused by all questions of that image (on the real
v1.6 geometry the image is ~2,900 of the ~2,950 tokens of a question, so this saves ~90% of the work). The
prefix is found on the prompts' ids before the image token is expanded, the vision tower stops at the layer
LLaVA reads, and the LLM takes the image features as ``inputs_embeds``; ``image_batch_size`` images can share
one vision-tower call (no gain on CPU, see ``bench_judge``).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ccsr.questions import parse_answer

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ccsr.config import Config

logger = logging.getLogger(__name__)


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


class TransformersJudge:
    """LLaVA-Next (``LlavaNextForConditionalGeneration``) answering yes/no questions about images."""

    def __init__(self, cfg: Config):
        import torch
        from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

        from ccsr.devices import torch_device, torch_dtype
        from ccsr.models import resolve_model

        self.cfg = cfg
        self.mode = cfg.judge.mode
        self.max_new_tokens = cfg.judge.max_new_tokens
        self.device = torch_device(cfg)
        self.dtype = torch_dtype(cfg)
        path = resolve_model(cfg.judge.model, cfg.model_cache)
        self.processor = LlavaNextProcessor.from_pretrained(
            path, trust_remote_code=cfg.judge.trust_remote_code
        )
        self.tokenizer = self.processor.tokenizer
        # Reloaded tokenizers default to right padding; batched generation reads the last position, which must
        # be a real token (FIELD-NOTES).
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        self.model = LlavaNextForConditionalGeneration.from_pretrained(
            path, dtype=self.dtype, trust_remote_code=cfg.judge.trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.image_token = self.processor.image_token
        self.image_token_id = self.processor.image_token_id
        self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer) if self.mode == "logits" else ([], [])
        self._yes = torch.tensor(self.yes_ids, device=self.device, dtype=torch.long)
        self._no = torch.tensor(self.no_ids, device=self.device, dtype=torch.long)
        self._answer_ids = torch.cat([self._yes, self._no])
        # A packed 4-D mask is added to the attention scores by the eager and SDPA kernels; flash attention
        # takes no arbitrary mask, so it falls back to one row per question over a repeated cache.
        attn = getattr(self.model.config.text_config, "_attn_implementation", None) or "sdpa"
        self.suffix_strategy = "packed" if attn in ("sdpa", "eager") else "batched"
        self._decoder = self._trimmable_decoder()
        self._exact_processor: bool | None = None  # None until the first image is checked (see _encode)
        # Images whose crops go through the vision tower in one call. On this 2-core CPU batching gains nothing
        # (bench_judge, tiny v1.6 model: 1 -> 3 images per call gave 7.15 -> 7.19 and 7.00 -> 6.69 images/s), so
        # the default keeps memory flat; on a GPU a larger value fills the device better.
        self.image_batch_size = 1
        # transformers 5 installs its hidden-state capturing hooks on the vision layers at the tower's first
        # forward; run one stock forward now so that they exist on every layer before _image_features runs the
        # tower with a shortened layer list (otherwise the stock path later misses the last layer's output).
        size = getattr(self.model.config.vision_config, "image_size", 336)
        with torch.inference_mode():
            self.model.model.vision_tower(
                torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype), output_hidden_states=True
            )

    # -- prompt building --------------------------------------------------------------------------------------

    def build_prompt(self, question: str) -> str:
        return llava_prompt(self.processor, question)

    def _add_special_tokens(self, prompt: str) -> bool:
        # A template that already starts with BOS must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        return not (bos is not None and prompt.startswith(bos))

    def _encode(
        self, image: Image.Image, questions: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """Token ids of every full prompt (image tokens expanded) and the processed image, preprocessing the
        image once. The first image a judge sees is also encoded by the processor itself; if the two
        encodings ever differ, the judge uses the processor for every question from then on."""
        prompts = [self.build_prompt(q) for q in questions]
        add_special = self._add_special_tokens(prompts[0])
        if self._exact_processor is not True:
            pixels = self.processor.image_processor(image, return_tensors="pt")
            n_image = self._image_token_count(image, pixels["image_sizes"])
            # The image token is a special token, tokenized on its own: expanding it after tokenization gives
            # the processor's ids without tokenizing ~2,900 copies of it per question.
            ids = [
                [t for tok in row for t in ([tok] * n_image if tok == self.image_token_id else [tok])]
                for row in self.tokenizer(prompts, add_special_tokens=add_special)["input_ids"]
            ]
        if self._exact_processor is None:
            reference = self.processor(images=image, text=prompts[0], add_special_tokens=add_special)
            self._exact_processor = list(reference["input_ids"][0]) != ids[0]
            if self._exact_processor:
                logger.warning("judge: own prompt encoding differs from the processor's; using the processor")
        if self._exact_processor:
            encoded = [self.processor(images=image, text=p, add_special_tokens=add_special) for p in prompts]
            ids = [list(e["input_ids"][0]) for e in encoded]
            pixels = self.processor(images=image, text=prompts[0], return_tensors="pt")
        image_inputs = {
            "pixel_values": pixels["pixel_values"].to(self.device, self.dtype),
            "image_sizes": pixels["image_sizes"].to(self.device),
        }
        return ids, image_inputs

    def _image_token_count(self, image: Image.Image, image_sizes: torch.Tensor) -> int:
        try:
            return int(
                self.processor._get_num_multimodal_tokens(image_sizes=image_sizes.tolist())[
                    "num_image_tokens"
                ][0]
            )
        except (
            AttributeError,
            KeyError,
            TypeError,
        ):  # a processor without that helper: count from its output
            text = self.build_prompt("?")
            ids = self.processor(images=image, text=text, add_special_tokens=self._add_special_tokens(text))
            return list(ids["input_ids"][0]).count(self.image_token_id)

    # -- answering --------------------------------------------------------------------------------------------

    def answer(self, images: list[Image.Image], questions: list[list[str]]) -> list[JudgeAnswer]:
        """``questions[i]`` are the rendered questions for ``images[i]``."""
        import torch

        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} question lists")
        out = []
        with torch.inference_mode():
            if self.mode == "logits":
                return self._answer_logits_many([image.convert("RGB") for image in images], questions)
            for image, qs in zip(images, questions, strict=True):
                out.append(self._answer_generate(image.convert("RGB"), qs))
        return out

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

    def _answer_logits(self, image: Image.Image, questions: list[str]) -> JudgeAnswer:
        return self._answer_logits_many([image], [questions])[0]

    def _answer_logits_many(self, images: list[Image.Image], questions: list[list[str]]) -> list[JudgeAnswer]:
        """Prefix reuse for a group of images: the vision tower runs once over the crops of all of them
        (``image_batch_size`` images per call), then each image gets one prefix forward and one suffix forward.
        """
        import torch

        plans = [self._plan(image, qs) for image, qs in zip(images, questions, strict=True)]
        out: list[JudgeAnswer | None] = [None] * len(images)
        todo = []
        for i, plan in enumerate(plans):
            if plan is None:  # the processor's own encoding, or an image outside the shared prefix
                ids, image_inputs = self._encode(images[i], questions[i])
                out[i] = self._decide(self._full_forward(ids, image_inputs))
            else:
                todo.append(i)
        for start in range(0, len(todo), max(1, self.image_batch_size)):
            group = todo[start : start + max(1, self.image_batch_size)]
            # The crops of all images of the group as one [sum crops, 3, H, W] batch: the model splits them back
            # by image_sizes. A single image is passed as a view (no copy of its ~7 MB of pixels).
            crops = [plans[i][2]["pixel_values"][0] for i in group]
            pixel_values = crops[0] if len(crops) == 1 else torch.cat(crops)
            image_sizes = torch.cat([plans[i][2]["image_sizes"] for i in group])
            features = self._image_features(pixel_values, image_sizes)
            for i, feature in zip(group, features, strict=True):
                prefix, suffixes, _ = plans[i]
                embeds = self.model.get_input_embeddings()(prefix)
                embeds = embeds.masked_scatter(
                    (prefix == self.image_token_id)[..., None].expand_as(embeds), feature.to(embeds.dtype)
                )
                if self.suffix_strategy == "packed" and self._decoder is not None:
                    out[i] = self._decide(self._trimmed_forward(embeds, suffixes))
                    continue
                cache = self.model(
                    inputs_embeds=embeds,
                    attention_mask=torch.ones_like(prefix),
                    use_cache=True,
                    logits_to_keep=1,
                ).past_key_values
                n_prefix = prefix.shape[1]
                if self.suffix_strategy == "packed":
                    logits = self._packed_suffix_forward(cache, n_prefix, suffixes)
                else:
                    logits = self._batched_suffix_forward(cache, n_prefix, suffixes)
                out[i] = self._decide(logits)
        return out  # type: ignore[return-value]

    def _plan(
        self, image: Image.Image, questions: list[str]
    ) -> tuple[torch.Tensor, list[list[int]], dict[str, torch.Tensor]] | None:
        """The shared prefix (image tokens expanded, as a [1, P] tensor), each question's suffix ids and the
        processed image; None when the fast path does not apply.

        The prefix is every token common to all prompts (chat header + image + ...), but at least one suffix
        token per question so each one has its own last position. It is found on the prompts' ids BEFORE the
        image token is expanded (~60 ids, not ~2,950): the image token is a special token, so expanding it
        after tokenization gives the processor's ids (checked on the first image by ``_encode``). Suffixes are
        slices of each full tokenization, never separate tokenizations (tokens can merge across the boundary).
        """
        import torch

        if self._exact_processor is None:
            self._encode(image, questions[:1])  # decides once whether our own encoding is exact
        if self._exact_processor:
            return None
        prompts = [self.build_prompt(q) for q in questions]
        rows = self.tokenizer(prompts, add_special_tokens=self._add_special_tokens(prompts[0]))["input_ids"]
        first = rows[0]
        n_prefix = min(len(x) for x in rows) - 1
        for x in rows[1:]:
            n_prefix = next((j for j in range(n_prefix) if first[j] != x[j]), n_prefix)
        if self.image_token_id not in first[:n_prefix] or first.count(self.image_token_id) != 1:
            return None
        pixels = self.processor.image_processor(image, return_tensors="pt")
        n_image = self._image_token_count(image, pixels["image_sizes"])
        k = first.index(self.image_token_id)
        prefix = torch.tensor(first[:k] + [self.image_token_id] * n_image + first[k + 1 : n_prefix])
        image_inputs = {
            "pixel_values": pixels["pixel_values"].to(self.device, self.dtype),
            "image_sizes": pixels["image_sizes"].to(self.device),
        }
        return prefix[None].to(self.device), [x[n_prefix:] for x in rows], image_inputs

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

    def _trimmable_decoder(self) -> Any:
        """The language model's decoder stack when ``_trimmed_forward`` can run it layer by layer: a Llama-style
        decoder (Llama, Mistral, Vicuna: pre-norm layers, rotary keys, no sliding window, no q/k norms) in
        transformers >= 5; None otherwise, and the stock forward is used."""
        import importlib

        lm = getattr(self.model.model, "language_model", None)
        layers = getattr(lm, "layers", None)
        if not layers or not all(hasattr(lm, a) for a in ("embed_tokens", "rotary_emb", "norm")):
            return None
        attn = getattr(layers[-1], "self_attn", None)
        rotary = getattr(importlib.import_module(type(attn).__module__), "apply_rotary_pos_emb", None)
        llama_like = all(hasattr(attn, a) for a in ("k_proj", "v_proj", "head_dim", "layer_idx"))
        llama_like = llama_like and hasattr(layers[-1], "input_layernorm")
        llama_like = llama_like and not any(hasattr(attn, a) for a in ("q_norm", "k_norm", "sinks"))
        transformers_5 = "position_embeddings" in inspect.signature(type(layers[-1]).forward).parameters
        if not (llama_like and rotary and transformers_5) or getattr(lm.config, "sliding_window", None):
            return None
        self._apply_rotary = rotary
        return lm

    def _run_layers(self, layers, hidden, position_ids, mask, cache) -> torch.Tensor:
        position_embeddings = self._decoder.rotary_emb(hidden, position_ids)
        for layer in layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    def _append_keys(self, layer, hidden, position_ids, cache) -> None:
        """Only the keys and values of ``layer`` for these positions, added to its cache (no attention, no MLP),
        computed as the layer's own attention computes them."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        keys = attn.k_proj(x).view(shape).transpose(1, 2)
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = self._decoder.rotary_emb(x, position_ids)
        _, keys = self._apply_rotary(keys, keys, cos, sin)
        cache.update(keys, values, attn.layer_idx)

    def _trimmed_forward(self, embeds: torch.Tensor, suffixes: list[list[int]]) -> torch.Tensor:
        """Prefix and packed suffixes (as ``_packed_suffix_forward``), computing only what the answers read.

        The last decoder layer's output is read at one position per question, the last token of its suffix.
        So for the prefix and every other suffix token that layer only needs its keys and values (two
        projections; no attention, no MLP), and its attention and MLP run on the 10 answer positions alone.
        The same idea as running the vision tower without the layers after the one LLaVA reads. It saves one
        layer in L of the language model's work: half of the tiny 2-layer model, ~3% of a 32-layer 7B model.
        """
        import torch
        from transformers import DynamicCache

        lm = self._decoder
        *front, last = lm.layers
        n_prefix = embeds.shape[1]
        cache = DynamicCache(config=lm.config)
        positions = torch.arange(n_prefix, device=self.device)[None]
        hidden = self._run_layers(front, embeds, positions, None, cache)  # None: causal (SDPA's is_causal)
        self._append_keys(last, hidden, positions, cache)

        lengths = torch.tensor([len(s) for s in suffixes], device=self.device)
        seq = torch.repeat_interleave(torch.arange(len(suffixes), device=self.device), lengths)
        starts = lengths.cumsum(0) - lengths
        local = torch.arange(len(seq), device=self.device) - starts[seq]
        ends = starts + lengths - 1
        is_end = torch.zeros(len(seq), dtype=torch.bool, device=self.device)
        is_end[ends] = True
        rest = (~is_end).nonzero()[:, 0]
        # Additive masks over [prefix | suffix keys]: a suffix token sees the prefix, and the earlier tokens of
        # its own suffix at their restarted positions.
        allowed = (seq[:, None] == seq[None, :]) & (local[None, :] <= local[:, None])
        blocked = torch.zeros(len(seq), n_prefix + len(seq), dtype=self.dtype, device=self.device)
        blocked[:, n_prefix:].masked_fill_(~allowed, torch.finfo(self.dtype).min)
        positions = (local + n_prefix)[None]
        hidden = lm.embed_tokens(torch.tensor([[t for s in suffixes for t in s]], device=self.device))
        hidden = self._run_layers(front, hidden, positions, blocked[None, None], cache)
        # Last layer: keys of the non-answer tokens are appended first, then the layer's own forward on the
        # answer tokens appends theirs, so its key order is [prefix | rest | ends]; the mask follows it.
        self._append_keys(last, hidden[:, rest], positions[:, rest], cache)
        order = torch.cat([torch.arange(n_prefix, device=self.device), n_prefix + rest, n_prefix + ends])
        mask = blocked[ends][:, order]
        hidden = self._run_layers([last], hidden[:, ends], positions[:, ends], mask[None, None], cache)
        return self.model.lm_head(lm.norm(hidden))[0]

    def _packed_suffix_forward(self, cache: Any, n_prefix: int, suffixes: list[list[int]]) -> torch.Tensor:
        """All suffixes in ONE row after the batch-1 prefix cache: each suffix token sees the whole prefix and
        the earlier tokens of its own suffix (block-diagonal causal mask), and its rotary position restarts at
        the end of the prefix, exactly as in that question's full sequence. No copy of the cache is made."""
        import torch

        lengths = [len(s) for s in suffixes]
        total = sum(lengths)
        packed = torch.tensor([[t for s in suffixes for t in s]], device=self.device)
        position_ids = torch.cat([torch.arange(n, device=self.device) for n in lengths])[None] + n_prefix
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=self.device), torch.tensor(lengths))
        seq = seq.to(self.device)
        local = position_ids[0] - n_prefix
        allowed = (seq[:, None] == seq[None, :]) & (local[None, :] <= local[:, None])
        # Additive float mask: both the eager and the SDPA kernels add it to the scores. Every suffix token sees
        # the whole prefix, so only the [S, S] suffix block needs filling.
        mask = torch.zeros(total, n_prefix + total, dtype=self.dtype, device=self.device)
        mask[:, n_prefix:].masked_fill_(~allowed, torch.finfo(self.dtype).min)
        ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
        out = self.model(
            input_ids=packed,
            attention_mask=mask[None, None],
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=ends,
        )
        return out.logits[0]

    def _batched_suffix_forward(self, cache: Any, n_prefix: int, suffixes: list[list[int]]) -> torch.Tensor:
        """One right-padded row per question over the prefix cache repeated per row. The mask must span prefix
        and suffix: a suffix-only mask is accepted silently and gives wrong answers (FIELD-NOTES)."""
        import torch

        lengths = [len(s) for s in suffixes]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id
        rows = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=self.device)
        suffix_mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=self.device)
        mask = torch.cat(
            [torch.ones(len(suffixes), n_prefix, dtype=torch.long, device=self.device), suffix_mask], 1
        )
        cache.batch_repeat_interleave(len(suffixes))  # in place
        out = self.model(input_ids=rows, attention_mask=mask, past_key_values=cache, use_cache=True)
        ends = torch.tensor(lengths, device=self.device) - 1
        return out.logits[torch.arange(len(suffixes), device=self.device), ends]

    def _full_forward(self, ids: list[list[int]], image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reference path without prefix reuse: one left-padded row per question, image repeated."""
        import torch

        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        rows = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        n = len(ids)
        out = self.model(
            input_ids=rows,
            attention_mask=mask,
            pixel_values=image_inputs["pixel_values"].expand(n, *image_inputs["pixel_values"].shape[1:]),
            image_sizes=image_inputs["image_sizes"].expand(n, -1),
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _answer_generate(self, image: Image.Image, questions: list[str]) -> JudgeAnswer:
        """Free text (greedy, ``judge.max_new_tokens``) parsed by ``parse_answer``: the paper's way, kept for
        models whose yes/no is not a single token or to read what the model actually says."""
        import torch

        ids, image_inputs = self._encode(image, questions)
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        rows = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        n = len(ids)
        generated = self.model.generate(
            input_ids=rows,
            attention_mask=mask,
            pixel_values=image_inputs["pixel_values"].expand(n, *image_inputs["pixel_values"].shape[1:]),
            image_sizes=image_inputs["image_sizes"].expand(n, -1),
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=pad,
        )
        texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        return JudgeAnswer(answers=[parse_answer(t) for t in texts], p_yes=[None] * n)

    def close(self) -> None:
        from ccsr.devices import free_memory

        for name in ("model", "processor", "tokenizer"):
            if hasattr(self, name):
                delattr(self, name)
        free_memory()
