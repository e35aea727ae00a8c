"""Tiny Mistral prompter: MistralForCausalLM of the real architecture at toy size, plus the tiny tokenizer.

Random weights sample random tokens, which no prompt parser can split into prompts. So the builder spends a
few seconds (a fixed number of steps, not a time limit, to stay deterministic) fitting the model to chats whose
answer is a numbered list of photo prompts ("1. A photo of a zebra in the forest, soft light.\\n2. ...</s>").
The result is not a language model worth the name, but its samples have the shape of a real prompter's
answers: numbered lines, varied words, an end-of-sequence token.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from ccsr.devices import torch_threads
from ccsr.tiny.tokenizer import SCENES, STYLE, SUBJECTS, build_tokenizer

logger = logging.getLogger(__name__)

TRAIN_STEPS = 120
BATCH_SIZE = 16
LEARNING_RATE = 5e-3
MAX_LENGTH = 256

_USER_TURNS = (
    "Write {n} diverse prompts for a text-to-image model about {c}. One prompt per line, numbered.",
    "Generate {n} photo-realistic image prompts of a {c}.",
    "You write prompts for Stable Diffusion. Class: {c}. Give {n} prompts as a numbered list.",
    "List {n} detailed photo prompts featuring a {c}, each on its own line.",
)
_TEMPLATES = (
    "A photo of a {c} in the {s}, {l} light.",
    "A {c} standing in the {s} at {t}, {l} lighting, 85mm lens.",
    "Close-up portrait of a {c} near the {s}, {l} light, shallow depth of field.",
    "A realistic photograph of a {c} in a {s} during {t}, {l}, high resolution.",
    "Wide shot of a {c} walking through the {s}, {l} light, wildlife documentary photo.",
    "A detailed photo of two {c}s in the {s}, {l} lighting, sharp focus, 35mm.",
)
_TIMES = ("sunset", "sunrise", "dawn", "dusk", "night", "golden hour", "midday")


def _training_chats(rng: random.Random, n_chats: int) -> list[list[dict[str, str]]]:
    subjects, scenes, lights = SUBJECTS.split()[:30], SCENES.split(), STYLE.split()[:40]
    chats = []
    for _ in range(n_chats):
        c = rng.choice(subjects)
        n = rng.randint(3, 10)
        lines = [
            f"{i + 1}. "
            + rng.choice(_TEMPLATES).format(
                c=c, s=rng.choice(scenes), l=rng.choice(lights), t=rng.choice(_TIMES)
            )
            for i in range(n)
        ]
        chats.append(
            [
                {"role": "user", "content": rng.choice(_USER_TURNS).format(n=n, c=c)},
                {"role": "assistant", "content": "\n".join(lines)},
            ]
        )
    return chats


def tiny_mistral_config(tokenizer, max_positions: int, **fields):
    """The toy-size Mistral of the prompter and of the judge's language tower: vocabulary and special ids
    from ``tokenizer`` (``ccsr.tiny.tokenizer``), ``max_positions`` positions; ``fields`` are further
    ``MistralConfig`` fields."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **fields,
    )


def build_mistral(out_dir: Path, seed: int = 0) -> None:
    """Write a loadable tiny Mistral (safetensors + tokenizer + chat template) to ``out_dir``."""
    import torch
    from transformers import MistralForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = MistralForCausalLM(tiny_mistral_config(tokenizer, max_positions=2048))
    _fit_numbered_lists(model, tokenizer, seed)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)


def _fit_numbered_lists(model, tokenizer, seed: int) -> None:
    """A fixed number of AdamW steps on synthetic numbered-list chats (20 s measured on a busy 2-core CPU)."""
    import torch

    rng = random.Random(seed)
    chats = _training_chats(rng, TRAIN_STEPS * BATCH_SIZE)
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    tokenizer.padding_side = "right"
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    with torch_threads(1):
        for step in range(TRAIN_STEPS):
            _train_step(model, tokenizer, optimizer, texts[step * BATCH_SIZE : (step + 1) * BATCH_SIZE], step)
    tokenizer.padding_side = "left"
    logger.info("tiny mistral fit: %d steps in %.1f s", TRAIN_STEPS, time.perf_counter() - start)


def _train_step(model, tokenizer, optimizer, texts: list[str], step: int) -> None:
    batch = tokenizer(
        texts,
        add_special_tokens=False,  # the chat template already starts with <s>
        padding=True,
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="pt",
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % 50 == 0 or step == TRAIN_STEPS - 1:
        logger.info("tiny mistral fit: step %d loss %.3f", step, loss.item())
