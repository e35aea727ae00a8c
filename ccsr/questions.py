"""The question set and paper eq. (1): what the judge is asked about every image, and how its answers score.

Pure rules, no model and no torch: a question set is validated data (``prompts/questions.yaml``), rendered
for one (class, prompt), its answers resolved by the dependency rule and scored.

Eq. (1): for each question, +1 if (positive and 'yes') or (negative and 'no'), -1 if (negative and 'yes'),
0 otherwise ('nan', unparseable, positive and 'no'). Questions that depend on another (paper Q4-Q7 on Q3)
count as 'nan' when their parent was answered 'no'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ANSWERS = ("yes", "no", "nan")
POLARITIES = ("positive", "negative")
PLACEHOLDERS = ("class_name", "prompt")
_PLACEHOLDER_RE = re.compile(r"\{(class_name|prompt)\}")
# Anything that looks like a placeholder, to catch typos such as {class} or the paper's {prompt3}.
_ANY_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_QUESTION_KEYS = ("id", "text", "polarity", "depends_on")
_TOP_KEYS = ("instruction", "questions")


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    polarity: str  # "positive": 'yes' is rewarded; "negative": 'yes' is penalised (paper sec. 2.3)
    depends_on: str | None = None  # id of the question whose 'no' turns this one into 'nan'


@dataclass
class QuestionSet:
    questions: list[Question]
    instruction: str = ""
    source: str = "<memory>"
    _order: list[int] = field(init=False, repr=False)  # parents before children, for apply_dependencies

    def __post_init__(self) -> None:
        self._order = self._validate()

    @classmethod
    def load(cls, path: str | Path) -> QuestionSet:
        """Read and validate a question file; any problem raises ``ValueError`` naming file and question."""
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{source}: question file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{source}: cannot read question file ({exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ValueError(f"{source}: not valid YAML{where}") from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> QuestionSet:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: the top level must be a mapping with keys {', '.join(_TOP_KEYS)}")
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(_TOP_KEYS)})")
        instruction = data.get("instruction", "") or ""
        if not isinstance(instruction, str):
            raise ValueError(f"{source}: 'instruction' must be a string, got {instruction!r}")
        items = data.get("questions")
        if not isinstance(items, list) or not items:
            raise ValueError(f"{source}: 'questions' must be a non-empty list")
        questions = []
        for i, item in enumerate(items):
            where = f"{source}: question #{i + 1}"
            if not isinstance(item, dict):
                raise ValueError(f"{where}: must be a mapping with keys {', '.join(_QUESTION_KEYS)}")
            qid = item.get("id")
            if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid).strip() == "":
                raise ValueError(f"{where}: missing or empty 'id'")
            qid = str(qid)
            where = f"{source}: question {qid}"
            unknown = sorted(set(item) - set(_QUESTION_KEYS))
            if unknown:
                raise ValueError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(_QUESTION_KEYS)})")
            text = item.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: missing or empty 'text'")
            polarity = item.get("polarity")
            if polarity not in POLARITIES:
                raise ValueError(f"{where}: polarity must be positive or negative, got {polarity!r}")
            depends_on = item.get("depends_on")
            if depends_on is not None:
                depends_on = str(depends_on)
            questions.append(Question(qid, text, polarity, depends_on))
        return cls(questions, instruction=instruction, source=source)

    def _validate(self) -> list[int]:
        src = self.source
        if not self.questions:
            raise ValueError(f"{src}: no questions")
        index: dict[str, int] = {}
        for i, q in enumerate(self.questions):
            if q.id in index:
                raise ValueError(f"{src}: question {q.id}: duplicate id")
            index[q.id] = i
            if q.polarity not in POLARITIES:
                raise ValueError(
                    f"{src}: question {q.id}: polarity must be positive or negative, got {q.polarity!r}"
                )
            for name in _ANY_PLACEHOLDER_RE.findall(q.text):
                if name not in PLACEHOLDERS:
                    raise ValueError(
                        f"{src}: question {q.id}: unknown placeholder {{{name}}} (known: {{class_name}}, {{prompt}})"
                    )
        for q in self.questions:
            if q.depends_on is None:
                continue
            if q.depends_on == q.id:
                raise ValueError(f"{src}: question {q.id}: depends_on names the question itself")
            if q.depends_on not in index:
                raise ValueError(f"{src}: question {q.id}: depends_on '{q.depends_on}' is not a question id")
        # Follow each chain to its root; a chain longer than the set is a cycle.
        for q in self.questions:
            seen = [q.id]
            cur = q
            while cur.depends_on is not None:
                cur = self.questions[index[cur.depends_on]]
                if cur.id in seen:
                    raise ValueError(
                        f"{src}: question {q.id}: cyclic depends_on ({' -> '.join([*seen, cur.id])})"
                    )
                seen.append(cur.id)
        for name in PLACEHOLDERS:
            if not any("{" + name + "}" in q.text for q in self.questions):
                raise ValueError(
                    f"{src}: question {self.questions[-1].id}: no question mentions {{{name}}}; at least one must"
                )
        # Depth-first order so that every parent is resolved before its children.
        order: list[int] = []
        done: set[int] = set()

        def visit(i: int) -> None:
            if i in done:
                return
            parent = self.questions[i].depends_on
            if parent is not None:
                visit(index[parent])
            done.add(i)
            order.append(i)

        for i in range(len(self.questions)):
            visit(i)
        return order

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def ids(self) -> list[str]:
        return [q.id for q in self.questions]

    def render(self, class_name: str, prompt: str) -> list[str]:
        """The questions as sent to the model. Substitution is literal and single-pass: a class name or an
        LLM-written prompt containing braces or '{class_name}' is inserted verbatim, never re-templated."""
        values = {"class_name": class_name, "prompt": prompt}
        out = []
        for q in self.questions:
            text = _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], q.text)
            out.append(f"{text} {self.instruction}".rstrip() if self.instruction else text)
        return out

    def _check_length(self, values: list[Any], what: str) -> None:
        if len(values) != len(self.questions):
            raise ValueError(f"{self.source}: got {len(values)} {what} for {len(self.questions)} questions")

    def apply_dependencies(self, answers: list[str]) -> list[str]:
        """Answers with dependents of a 'no' turned into 'nan' (paper Q4-Q7: "if the answer of the previous
        question is 'No' answer 'Nan'"). A dependent of a question that was itself turned 'nan' by this rule is
        'nan' too; a parent that the model left unanswered ('nan') does not void its dependents."""
        self._check_length(answers, "answers")
        index = {q.id: i for i, q in enumerate(self.questions)}
        out = [a if a in ANSWERS else "nan" for a in answers]
        voided: set[int] = set()
        for i in self._order:
            parent = self.questions[i].depends_on
            if parent is None:
                continue
            p = index[parent]
            if out[p] == "no" or p in voided:
                out[i] = "nan"
                voided.add(i)
        return out

    def score(self, answers: list[str]) -> int:
        """Paper eq. (1), after the dependency rule."""
        total = 0
        for q, a in zip(self.questions, self.apply_dependencies(answers), strict=True):
            if q.polarity == "positive":
                total += a == "yes"
            else:
                total += 1 if a == "no" else -1 if a == "yes" else 0
        return total


def signed_p_yes(
    question_set: QuestionSet, p_yes: list[float | None], answers: list[str] | None = None
) -> float:
    """Tie-break for images with the same eq. (1) score (``filter.tie_break: p_yes``, not in the paper): the
    polarity-signed sum of P(yes), +p for positive questions and -p for negative ones. Questions that are
    'nan' by the dependency rule (decided from ``answers`` if given, else from p_yes > 0.5) and missing
    probabilities are skipped."""
    question_set._check_length(p_yes, "probabilities")
    if answers is None:
        answers = ["nan" if p is None else "yes" if p > 0.5 else "no" for p in p_yes]
    resolved = question_set.apply_dependencies(answers)
    total = 0.0
    for q, p, a, r in zip(question_set.questions, p_yes, answers, resolved, strict=True):
        if p is None or (r == "nan" and a != "nan"):
            continue
        total += p if q.polarity == "positive" else -p
    return total


# Leading decoration: whitespace, quotes, markdown emphasis/headers/bullets, and labels such as "Answer:".
_LEAD_RE = re.compile(
    r"""^(?:[\s"'`*_#>\-•\[\(]+|(?:final\s+)?answer\s*[:\-]\s*|a\s*:\s*|assistant\s*:\s*)+""", re.I
)
_WORD_RE = re.compile(r"[A-Za-z]+(?:/[A-Za-z]+)?")


def parse_answer(text: str) -> str:
    """'yes', 'no' or 'nan' from a free-text answer: the first word decides ("Yes, the image shows..." ->
    'yes'; "**No** - ..." -> 'no'; "N/A" -> 'nan'). Anything else is 'nan' (scores 0 in eq. 1)."""
    if not isinstance(text, str):
        return "nan"
    rest = _LEAD_RE.sub("", text.strip(), count=1)
    m = _WORD_RE.match(rest)
    if not m:
        return "nan"
    word = m.group(0).lower()
    if word in ("yes", "yeah", "yep"):
        return "yes"
    if word in ("no", "nope"):
        return "no"
    # "nan", "N/A", "none", a hedge or a sentence: no usable answer.
    return "nan"


def load_question_set(questions_file: str | Path) -> QuestionSet:
    """The question set a config names (``judge.questions``), found as every data file a config names is
    (``ccsr.config_files.resolve_data_path``: as given, else the copy shipped with ccsr). Raises ``ValueError`` as
    ``QuestionSet.load`` does."""
    from ccsr.config_files import resolve_data_path

    return QuestionSet.load(resolve_data_path(questions_file))
