"""Prefix-KV reuse: ``TransformersJudge``'s fast path in logits mode (``judge.prefix_reuse``, on by default).

Every question of an image has the same start: the chat header, the image and the prompt text before the
question. That shared prefix goes through the model once and its KV cache is reused by all questions (on the
real v1.6 geometry the image is ~2,900 of the ~2,950 tokens of a question, so this saves ~90% of the work).
Then every question's suffix is read from that cache in one forward:

- ``suffix_strategy="packed"`` (eager and SDPA attention): all suffixes in ONE row with a block-diagonal
  causal mask, positions restarting at the prefix length;
- ``suffix_strategy="batched"`` (attention kernels that take no arbitrary mask, e.g. flash attention): one
  row per question over the prefix cache repeated per row.

The result is the next-token logits at every question's last token, the same rows (to float rounding) as the
judge's plain full forward gives, which ``TransformersJudge._decide`` turns into answers. Where prefix reuse
does not apply (the judge's own prompt encoding differs from the processor's, or the image is not in the
shared prefix) the judge uses its full forward.

These functions are the judge's own fast path: they take the ``TransformersJudge`` and use its model, its
prompt encoding (``_tokenize``, ``_process_image``, ``_encode``) and its suffix and image-batch settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from ccsr.compat import kv_cache_name, pooled_output

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ccsr.judge import TransformersJudge

SUFFIX_STRATEGIES = ("packed", "batched")


class PrefixPlan(NamedTuple):
    """One image's questions split for prefix reuse."""

    prefix: torch.Tensor  # [1, P] ids shared by every prompt, the image token expanded
    suffixes: list[list[int]]  # each question's remaining ids (at least one)
    # The processed image: pixel_values [1, crops, 3, H, W] and image_sizes [1, 2].
    image_inputs: dict[str, torch.Tensor]


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


def plan(judge: TransformersJudge, image: Image.Image, questions: list[str]) -> PrefixPlan | None:
    """The shared prefix, each question's suffix and the processed image; None when prefix reuse does not
    apply (the processor's own encoding is in use, or the image is not in the shared prefix).

    The prefix is every token common to all prompts (chat header + image + ...), but at least one suffix
    token per question so each one has its own last position. It is found on the prompts' ids BEFORE the
    image token is expanded (checked against the processor on the first image by ``judge._encode``). Suffixes
    are slices of each full tokenization, never separate tokenizations (tokens can merge across the
    boundary)."""
    import torch

    if judge._use_processor_encoding is None:
        judge._encode(image, questions[:1])  # decides once whether the judge's own encoding is exact
    if judge._use_processor_encoding:
        return None
    rows = judge._tokenize(questions)
    first = rows[0]
    n_prefix = min(len(x) for x in rows) - 1
    for x in rows[1:]:
        n_prefix = next((j for j in range(n_prefix) if first[j] != x[j]), n_prefix)
    image_token = judge.image_token_id
    if image_token not in first[:n_prefix] or first.count(image_token) != 1:
        return None
    image_inputs, n_image = judge._process_image(image)
    k = first.index(image_token)
    prefix = first[:k] + [image_token] * n_image + first[k + 1 : n_prefix]
    return PrefixPlan(torch.tensor([prefix], device=judge.device), [x[n_prefix:] for x in rows], image_inputs)


def suffix_logits(
    judge: TransformersJudge, images: list[Image.Image], questions: list[list[str]]
) -> list[torch.Tensor | None]:
    """Per image, the next-token logits [n_questions, vocab] at each question's last token, or None where
    prefix reuse does not apply. The vision tower runs over the crops of ``judge.image_batch_size`` images
    per call; then each image gets one prefix and one suffix forward."""
    import torch

    plans = [plan(judge, image, qs) for image, qs in zip(images, questions, strict=True)]
    out: list[torch.Tensor | None] = [None] * len(images)
    todo = [i for i, p in enumerate(plans) if p is not None]
    for start in range(0, len(todo), judge.image_batch_size):
        group = todo[start : start + judge.image_batch_size]
        # The crops of all images of the group as one [sum crops, 3, H, W] batch: the model splits them back
        # by image_sizes. A single image is passed as a view (no copy of its ~7 MB of pixels).
        crops = [plans[i].image_inputs["pixel_values"][0] for i in group]
        pixel_values = crops[0] if len(crops) == 1 else torch.cat(crops)
        image_sizes = torch.cat([plans[i].image_inputs["image_sizes"] for i in group])
        features = pooled_output(
            judge.model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
        )
        for i, feature in zip(group, features, strict=True):
            out[i] = _prefix_then_suffixes(judge, plans[i], feature)
    return out


def _prefix_then_suffixes(judge: TransformersJudge, plan: PrefixPlan, feature: torch.Tensor) -> torch.Tensor:
    """Next-token logits at every question's last token: the prefix once (its image tokens replaced by the
    projected, packed image features), then all suffixes over its cache."""
    import torch

    embeds = judge.model.get_input_embeddings()(plan.prefix)
    is_image = (plan.prefix == judge.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(is_image, feature.to(embeds.dtype))
    # The all-ones 2-D mask makes the model build its causal mask under every attention implementation.
    output = judge.model(
        inputs_embeds=embeds, attention_mask=torch.ones_like(plan.prefix), use_cache=True, logits_to_keep=1
    )
    cache = getattr(output, kv_cache_name())
    n_prefix = plan.prefix.shape[1]
    if judge.suffix_strategy == "packed":
        return _packed_suffix_forward(judge, cache, n_prefix, plan.suffixes)
    return _batched_suffix_forward(judge, cache, n_prefix, plan.suffixes)


def _packed_suffix_forward(
    judge: TransformersJudge, cache: Any, n_prefix: int, suffixes: list[list[int]]
) -> torch.Tensor:
    """All suffixes in ONE row after the batch-1 prefix cache (``packed_suffix_layout``); no copy of the
    cache is made."""
    import torch

    position_ids, mask, ends = packed_suffix_layout(
        [len(s) for s in suffixes], n_prefix, judge.dtype, judge.device
    )
    out = judge.model(
        input_ids=torch.tensor([[t for s in suffixes for t in s]], device=judge.device),
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        **{kv_cache_name(): cache},
        logits_to_keep=ends,
    )
    return out.logits[0]


def _batched_suffix_forward(
    judge: TransformersJudge, cache: Any, n_prefix: int, suffixes: list[list[int]]
) -> torch.Tensor:
    """One right-padded row per question over the prefix cache repeated per row. The mask must span prefix
    and suffix: a suffix-only mask is accepted without error and gives wrong answers."""
    import torch

    lengths = [len(s) for s in suffixes]
    width = max(lengths)
    pad = judge.tokenizer.pad_token_id
    rows = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=judge.device)
    mask = torch.tensor([[1] * (n_prefix + n) + [0] * (width - n) for n in lengths], device=judge.device)
    cache.batch_repeat_interleave(len(suffixes))  # in place
    out = judge.model(input_ids=rows, attention_mask=mask, use_cache=True, **{kv_cache_name(): cache})
    ends = torch.tensor(lengths, device=judge.device) - 1
    return out.logits[torch.arange(len(suffixes), device=judge.device), ends]
