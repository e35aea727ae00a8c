"""A tiny Mistral/Llama-style tokenizer, trained offline on a built-in corpus of photo-prompt vocabulary.

Same shape as the real Mistral tokenizer: SentencePiece-style "▁" word prefix, BPE with byte fallback
(``<0x00>`` .. ``<0xFF>`` so that any text, newlines included, round-trips), ``<s>`` / ``</s>`` / ``<unk>``,
and a ``[INST] ... [/INST]`` chat template with the system message folded into the first user turn.
Shared by the tiny Mistral prompter and the tiny LLaVA-Next judge (which adds ``<image>``).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

VOCAB_SIZE = 1500
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
INST_OPEN, INST_CLOSE = "[INST]", "[/INST]"

# Words the judge reads from logits: each one, bare and with the "▁" word prefix, must be one token.
ANSWER_WORDS = ("Yes", "No", "yes", "no")

# Mistral-Instruct's template layout: BOS once, "[INST] user [/INST]" then "assistant</s>"; Mistral has no
# system role, so a system message is prepended to the first user turn. A content given as a list of parts
# (the multimodal message format) renders image parts as "<image>\n" like the LLaVA-Next Mistral prompt.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = render(messages[0]['content']) -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message is defined -%}"
    "{{- '[INST] ' + system_message + '\\n\\n' + render(message['content']) + ' [/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + render(message['content']) + ' [/INST]' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + render(message['content']) + eos_token -}}"
    "{%- else -%}{{- raise_exception('Only system, user and assistant roles are supported') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

SUBJECTS = (
    "giraffe elephant zebra lion tiger cat dog horse cow sheep bear bird eagle owl parrot penguin fox wolf "
    "deer rabbit monkey dolphin whale shark fish turtle frog butterfly bee kangaroo koala panda camel "
    "person woman man child car bus truck train bicycle boat airplane bench chair table cup bottle"
)
SCENES = (
    "savanna grassland forest jungle desert beach ocean river lake mountain snow field meadow city street "
    "park garden farm zoo market kitchen room studio sky sunset sunrise night dawn dusk clouds rain fog "
    "trees water sand rocks grass flowers background foreground landscape horizon"
)
STYLE = (
    "photo photograph photorealistic realistic detailed close-up portrait wide shot angle view lens "
    "camera bokeh depth of field shallow focus sharp soft natural light lighting golden hour "
    "dramatic cinematic warm cool bright dark shadow high resolution 4k 8k DSLR 35mm 50mm 85mm f/1.8 "
    "ISO telephoto wildlife documentary award winning National Geographic style color colorful vivid"
)
_SENTENCES = (
    "A tall giraffe standing in the savanna at sunset, golden hour light, 85mm lens.",
    "An elephant walking through a dusty field, photorealistic, wide angle, high resolution.",
    "A zebra drinking water at a river in the morning, natural light, detailed photo.",
    "Close-up portrait of a lion resting in the grass, shallow depth of field, bokeh.",
    "Two young elephants playing in a muddy lake, wildlife documentary photo, 4k.",
    "A herd of zebras on the open grassland under a cloudy sky, 35mm, sharp focus.",
    "A giraffe eating leaves from a tall tree, soft light, award winning photograph.",
    "Write 10 diverse prompts for a text-to-image model about the class giraffe.",
    "Is there a giraffe in the image? Answer with yes or no.",
    "Is the image realistic? Does the image contain text? Is the animal fully visible?",
    "Is the main subject in focus? Are there any people in the image? Is the photo blurry?",
    "Here are 10 prompts:",
    "Sure! Here are some prompts for you.",
)
_ANSWERS = (
    "Yes",
    "No",
    "Yes.",
    "No.",
    "yes",
    "no",
    "(Yes)",
    "(No)",
    "(yes)",
    "(no)",
    "Answer: Yes",
    "Answer: No",
)


def corpus_lines() -> list[str]:
    """The training corpus: one text per line (no newlines inside, so a newline stays a byte token)."""
    subjects, scenes, style = SUBJECTS.split(), SCENES.split(), STYLE.split()
    lines = list(_SENTENCES)
    lines += [" ".join(words) for words in (subjects, scenes, style)]
    # Numbered prompt lists, the prompter's output format ("1. ...", "2. ..."), with digits 0-9 in use.
    for i, (subject, scene, light) in enumerate(
        itertools.islice(zip(itertools.cycle(subjects), itertools.cycle(scenes), itertools.cycle(style)), 200)
    ):
        lines.append(f"{i % 20 + 1}. A photo of a {subject} in the {scene}, {light}, {i % 10} {i * 7 % 100}.")
    # Punctuation and number spellings that prompts and answers use.
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 , . ; : ! ? ' \" ( ) [ ] - / & % + = * # @ _ ~")
    # Frequent enough that BPE merges each answer word into a single token, bare and "▁"-prefixed.
    lines += list(_ANSWERS) * 40
    return lines


def _train_base():
    """Train the BPE merges, then lay out the vocab like Mistral's: specials, 256 byte tokens, merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    specials = [UNK, BOS, EOS]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(specials) - len(byte_tokens),
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
    )
    scratch = Tokenizer(models.BPE())
    scratch.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    scratch.train_from_iterator(corpus_lines(), trainer=trainer)
    learned = scratch.get_vocab()
    merges = [tuple(m) for m in _merges_of(scratch)]

    vocab = {tok: i for i, tok in enumerate(specials + byte_tokens)}
    for tok, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    model = models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    # Llama/Mistral layout: "▁" marks a word start; the first piece gets one, pieces after special tokens
    # don't (prepend_scheme "first"), as in the non-legacy Llama tokenizer.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def _merges_of(tokenizer) -> list[list[str]]:
    import json

    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # tokenizers >= 0.20 stores merges as pairs; older versions as "a b" strings.
    return [m if isinstance(m, list) else m.split(" ", 1) for m in merges]


def build_tokenizer(out_dir: Path | None = None, extra_special: list[str] = ()) -> PreTrainedTokenizerFast:
    """Build the tiny Mistral-style tokenizer (deterministic); ``save_pretrained(out_dir)`` if given."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_base()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS, PAD, INST_OPEN, INST_CLOSE)]
    )
    if extra_special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[INST_OPEN, INST_CLOSE, *extra_special],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    for word in ANSWER_WORDS:
        for piece in (word, "▁" + word):
            if piece not in tokenizer.get_vocab():
                raise RuntimeError(f"tiny tokenizer: '{piece}' is not a single token; enlarge the corpus")
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
