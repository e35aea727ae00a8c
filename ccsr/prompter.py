"""Prompter: an LLM writes class-conditioned text-to-image prompts (paper section 3.1).

The backend only turns a chat into sampled completions; parsing the completions into prompts, dropping
near-duplicates and asking again until enough are collected is shared by every backend and lives here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ccsr.config_files import resolve_data_path
from ccsr.seeds import derive_seed

if TYPE_CHECKING:
    from ccsr.config import Config
    from ccsr.roles import Prompter

logger = logging.getLogger(__name__)

# An item marker at the start of a line: "1.", "1)", "#1", "1:", "(1)", "-", "*", "•".
_ITEM = re.compile(r"^\s*(?:\(?#?\d{1,3}\s*[.):\]]|#\d{1,3}\b|[-*•+])\s+")
_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:prompt|t2i prompt|image prompt)\s*(?:#?\d+)?\s*[:\-]\s*(?:\*\*)?\s*", re.I
)
# A bold title before the prompt: "**Savanna sunset:** a giraffe ...", "**Morning mist** - a giraffe ...".
_TITLE = re.compile(r"^(?:\*\*|__)([^*_\n]{1,60}?)(?::\s*(?:\*\*|__)|(?:\*\*|__)\s*[:\-–—])\s*(?=\S)")
_CLOSING = re.compile(
    r"^\s*(?:i hope|hope these|let me know|feel free|these prompts|enjoy|note:|remember|each prompt|"
    r"these should|i have|i've|happy)",
    re.I,
)
_WORD = re.compile(r"[\w'-]+", re.UNICODE)
_QUOTES = "\"'“”‘’`"
# A fenced block (```json ... ```); an unclosed fence runs to the end of the answer.
_FENCE = re.compile(r"```[\w-]*[ \t]*\n(.*?)(?:```|\Z)", re.S)
# The fields of a JSON object that may hold its prompt, in order of preference (names in any case).
_PROMPT_FIELDS = ("prompt", "text", "caption", "description")


def _is_preamble(line: str) -> bool:
    text = line.strip().lower()
    if text.endswith(":") and len(text.split()) <= 15:
        return True
    return bool(re.match(r"^(?:sure|here are|here is|certainly|of course|okay|ok)\b", text))


def _prompt_field(obj: dict) -> str | None:
    fields = {str(key).lower(): value for key, value in obj.items()}
    return next((fields[f] for f in _PROMPT_FIELDS if isinstance(fields.get(f), str)), None)


def _json_strings(data) -> list[str] | None:
    """The prompts of a decoded JSON value: a list of strings, a list of objects with a prompt field, or an
    object holding one such list (``{"prompts": [...]}``); None for anything else."""
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        return _json_strings(lists[0]) if len(lists) == 1 else None
    if not isinstance(data, list):
        return None
    found = [e if isinstance(e, str) else _prompt_field(e) if isinstance(e, dict) else None for e in data]
    strings = [f for f in found if f is not None]
    return strings or None


def _json_prompts(text: str) -> list[str] | None:
    """The first JSON list of prompts in the answer: inside a fenced block, or anywhere between a preamble and
    a closing remark. None when there is none (the answer is read line by line instead)."""
    decoder = json.JSONDecoder()
    for block in [*_FENCE.findall(text), text]:
        for opening in re.finditer(r"[\[{]", block):
            try:
                data, _ = decoder.raw_decode(block, opening.start())
            except ValueError:
                continue
            strings = _json_strings(data)
            if strings is not None:
                return strings
    return None


def _json_line(text: str) -> str:
    """One line of a JSON answer that was cut off (a string or an object with a prompt field, with its
    trailing comma): its prompt. Any other text is returned as it is."""
    candidate = text.strip().rstrip(",").strip()
    if candidate[:1] not in ('"', "{"):
        return text
    try:
        data = json.loads(candidate)
    except ValueError:
        return text
    if isinstance(data, str):
        return data
    return (_prompt_field(data) or "") if isinstance(data, dict) else text


def _clean(text: str, class_name: str) -> str:
    text = _json_line(text)
    text = _ITEM.sub("", text, count=1)
    text = _LABEL.sub("", text)
    title = _TITLE.match(text)
    if title and len(title.group(1).split()) <= 8:
        text = text[title.end() :]
    text = text.replace("**", "").replace("__", "")
    text = re.sub(r"\s+", " ", text).strip()
    # A "giraffe;" / "Giraffe:" prefix some models put before each prompt.
    text = re.sub(rf"^{re.escape(class_name)}\s*[;:|]\s*", "", text, flags=re.I)
    text = text.strip().rstrip(",").strip().strip(_QUOTES).strip()
    return text


def _join(lines: list[str]) -> str:
    """One item's lines as one prompt; a short title line of its own ("1. Savanna sunset:") is dropped."""
    head = _ITEM.sub("", lines[0], count=1).replace("**", "").replace("__", "").strip()
    if len(lines) > 1 and head.endswith(":") and len(head.split()) <= 8:
        lines = lines[1:]
    return " ".join(line.strip() for line in lines)


def _continues(line: str, previous: str) -> bool:
    """Whether an unnumbered line is the rest of the previous prompt, wrapped: it is indented, or the previous
    line ends in a comma and this one starts in lower case; a quoted or JSON line, or one with a label of its
    own ("Prompt 2:"), starts a prompt."""
    stripped = line.strip()
    if stripped[:1] in _QUOTES + "[{" or _LABEL.match(stripped):
        return False
    before = previous.rstrip()
    wrapped = (
        before.endswith((",", ";")) and before[-2:-1] not in _QUOTES + "]}" and not stripped[0].isupper()
    )
    return wrapped or line[:1] in (" ", "\t")


def _line_items(text: str) -> list[str]:
    """The answer split into prompts line by line (see ``parse_prompts``)."""
    lines = text.replace("\r\n", "\n").split("\n")
    numbered = any(_ITEM.match(line) for line in lines)
    items: list[list[str]] = []
    current: list[str] | None = None
    for line in lines:
        stripped = line.strip()
        if not stripped:
            current = None
            continue
        if numbered:
            if _ITEM.match(line):
                current = [stripped]
                items.append(current)
            elif current is not None and not _CLOSING.match(stripped):
                current.append(stripped)  # a prompt wrapped over several lines
            # else: preamble before the first item, or a closing remark
        elif _is_preamble(stripped) or _CLOSING.match(stripped):
            current = None
        elif current is not None and _continues(line, current[-1]):
            current.append(stripped)
        else:
            current = [stripped]
            items.append(current)
    joined = [_join(item) for item in items]
    return [item for item in joined if not _CLOSING.match(item) and (numbered or not _is_preamble(item))]


def parse_prompts(text: str, class_name: str, min_words: int = 3) -> list[str]:
    """Split one raw LLM completion into prompts.

    A JSON answer (a list of strings, a list of objects with a ``prompt`` field, or an object holding such a
    list; in a fenced block or between a preamble and a closing remark) is read as JSON. Anything else, and a
    JSON answer that was cut off, line by line: numbered lists ("1.", "1)", "#1"), bullets, "Prompt 2:"
    labels, bold titles, quoted prompts, a preamble or closing remark, blank lines and prompts wrapped over
    several lines. Numbers inside a prompt ("f/2.8", "two giraffes") survive. Prompts shorter than
    ``min_words`` words are dropped, and a "giraffe:" prefix before each prompt is removed.
    """

    def cleaned(items: list[str]) -> list[str]:
        prompts = [_clean(item, class_name) for item in items]
        return [p for p in prompts if len(_WORD.findall(p)) >= min_words]

    from_json = _json_prompts(text)
    if from_json is not None:
        prompts = cleaned(from_json)
        if prompts:
            return prompts
    return cleaned(_line_items(text))


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < 2:
        return {tuple(words)}
    return {tuple(words[i : i + 2]) for i in range(len(words) - 1)}


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of word bigrams: 1.0 for the same words in the same order, ~0 for unrelated."""
    sa, sb = _shingles(a), _shingles(b)
    if not sa or not sb:
        return 0.0
    return len(sa & sb) / len(sa | sb)


def diversity(prompts: list[str]) -> dict[str, float]:
    """Mean pairwise similarity (lower is more diverse) and the share of distinct word bigrams."""
    n = len(prompts)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    mean_sim = sum(similarity(prompts[i], prompts[j]) for i, j in pairs) / len(pairs) if pairs else 0.0
    grams = [g for p in prompts for g in _shingles(p)]
    distinct = len(set(grams)) / len(grams) if grams else 0.0
    return {"mean_pairwise_similarity": round(mean_sim, 4), "distinct_bigrams": round(distinct, 4)}


def limit_words(prompt: str, max_words: int) -> str:
    words = prompt.split()
    return prompt if len(words) <= max_words else " ".join(words[:max_words])


# The most completions one call asks for. Each call owns this many consecutive seeds, so a backend may give
# sample i the seed ``seed + i`` (vLLM does so for an n > 1 request) without reaching the next call's seeds.
MAX_SAMPLES_PER_CALL = 4


@dataclass
class PromptBatch:
    prompts: list[str]
    dropped: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    completions: int = 0


def build_messages(cfg: Config, class_name: str, n: int) -> list[dict[str, str]]:
    """System prompt and examples are data files; placeholders are replaced literally (no str.format)."""
    system = resolve_data_path(cfg.prompter.system_prompt).read_text(encoding="utf-8")
    examples = resolve_data_path(cfg.prompter.examples).read_text(encoding="utf-8").strip()
    text = system.replace("{examples}", examples).replace("{n}", str(n)).replace("{class_name}", class_name)
    return [{"role": "user", "content": text.strip()}]


def seeds_per_collection(cfg: Config) -> int:
    """How many sample seeds one ``collect_prompts`` may use: a block per call of its retry budget."""
    return cfg.prompter.max_attempts * MAX_SAMPLES_PER_CALL


def stream_seed(cfg: Config, stream: int) -> int:
    """The first seed of one collection of a run: stream 0 is the validation prompts, k iteration k.

    Streams are ``seeds_per_collection`` apart from one offset of the run, so no two collections of a run
    share a sample seed (derived seeds per stream could collide, and vLLM's ``seed + i`` per sample made
    neighbouring seeds share samples).
    """
    if stream < 0:
        raise ValueError(f"prompt stream must be >= 0 (0 validation, k iteration k), got {stream}")
    return derive_seed(cfg.seed, "prompts") + stream * seeds_per_collection(cfg)


def collect_prompts(
    backend: Prompter,
    cfg: Config,
    class_name: str,
    n: int,
    avoid: list[str],
    seed: int,
    held_out: Sequence[str] = (),
) -> PromptBatch:
    """Ask until ``n`` new prompts are collected or ``max_attempts`` calls are spent.

    Uses the sample seeds ``seed .. seed + seeds_per_collection(cfg) - 1`` (call a gets the block starting
    at ``seed + a * MAX_SAMPLES_PER_CALL``); collections of one run take their ``seed`` from ``stream_seed``.
    A prompt is dropped when it is too short, or nearly the same (similarity above the threshold) as one
    already kept or one of ``avoid`` (an earlier iteration's), or as a validation prompt (``held_out``). A
    validation prompt itself (similarity 1) is dropped whatever the threshold: a threshold of 1, which keeps
    repeats of earlier iterations' prompts, must not let the loop train on what its gate evaluates.
    """
    pc = cfg.prompter
    batch = PromptBatch(prompts=[], dropped={"near_duplicate": 0, "unparsable": 0})
    messages = build_messages(cfg, class_name, pc.prompts_per_call)
    while len(batch.prompts) < n and batch.attempts < pc.max_attempts:
        needed = -(-(n - len(batch.prompts)) // pc.prompts_per_call)
        num = max(1, min(MAX_SAMPLES_PER_CALL, needed))
        call_seed = seed + batch.attempts * MAX_SAMPLES_PER_CALL
        completions = backend.sample(messages, num=num, seed=call_seed)
        batch.attempts += 1
        batch.completions += len(completions)
        for text in completions:
            found = parse_prompts(text, class_name)
            if not found:
                batch.dropped["unparsable"] += 1
            for prompt in found:
                prompt = limit_words(prompt, pc.max_words)
                if cfg.prompter.ensure_class and class_name.lower() not in prompt.lower():
                    # Class-conditioned: a prompt that lost its subject would train on something else.
                    prompt = f"{class_name}, {prompt}"
                near = [similarity(prompt, p) for p in batch.prompts + avoid]
                held = [similarity(prompt, p) for p in held_out]
                if any(x > pc.similarity_threshold for x in near) or any(
                    x > pc.similarity_threshold or x >= 1.0 for x in held
                ):
                    batch.dropped["near_duplicate"] += 1
                    continue
                if len(batch.prompts) < n:
                    batch.prompts.append(prompt)
    if len(batch.prompts) < n:
        logger.warning(
            "prompter: %d of %d prompts after %d attempts (dropped: %s)",
            len(batch.prompts),
            n,
            batch.attempts,
            batch.dropped,
        )
    return batch


class TransformersPrompter:
    """Any causal LM folder or hub id with a chat template, through transformers (a ``roles.Prompter``)."""

    model_keys = ("prompter.model",)

    def __init__(self, cfg: Config):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ccsr.devices import torch_device, torch_dtype
        from ccsr.models import resolve_model

        self.cfg = cfg
        path = resolve_model(cfg.prompter.model, cfg.model_cache)
        self.device = torch_device(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.prompter.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(cfg), trust_remote_code=cfg.prompter.trust_remote_code
        ).to(self.device)
        self.model.eval()
        self._torch = torch

    def sample(self, messages: list[dict[str, str]], num: int, seed: int) -> list[str]:
        torch = self._torch
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = {k: v.to(self.device) for k, v in ids.items()}
        # All num samples from one generator seeded with the call's first seed: every call has a seed of its
        # own (collect_prompts), so no two calls share a stream. Reproducible on a given machine.
        torch.manual_seed(seed)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(
                **ids,
                do_sample=True,
                temperature=self.cfg.prompter.temperature,
                top_p=self.cfg.prompter.top_p,
                max_new_tokens=self.cfg.prompter.max_new_tokens,
                num_return_sequences=num,
                pad_token_id=pad,
            )
        new = out[:, ids["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def close(self) -> None:
        """Drop the model and tokenizer so their memory can be freed; safe to call again."""
        from ccsr.devices import free_memory

        for name in ("model", "tokenizer"):
            if hasattr(self, name):
                delattr(self, name)
        free_memory()
