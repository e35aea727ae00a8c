"""Question set, paper eq. (1), the dependency rule and free-text parsing (no model needed)."""

from __future__ import annotations

import pytest
import yaml

from ccsr.config_files import resolve_data_path
from ccsr.questions import QuestionSet, parse_answer, signed_p_yes

QUESTIONS = resolve_data_path("prompts/questions.yaml")


@pytest.fixture(scope="module")
def qs() -> QuestionSet:
    return QuestionSet.load(QUESTIONS)


def test_shipped_questions_are_the_papers(qs):
    assert qs.ids == [f"Q{i}" for i in range(1, 11)]
    assert [q.id for q in qs.questions if q.polarity == "negative"] == ["Q2", "Q6", "Q9"]
    assert [q.id for q in qs.questions if q.depends_on == "Q3"] == ["Q4", "Q5", "Q6", "Q7"]
    assert (
        qs.questions[0].text
        == "Does this image look realistic, considering lighting, shadows, and reflections?"
    )
    assert qs.questions[2].text == "can you clearly see {class_name} in the image?"
    assert (
        qs.questions[9].text == "Given PROMPT: {prompt}. Does the image respect fully the prompt description?"
    )


def test_render_substitutes_literally(qs):
    prompt = "a {class_name} with {braces} and {0} {prompt} \\1 $1"
    rendered = qs.render("gi{raffe}", prompt)
    assert len(rendered) == 10
    assert rendered[2] == "can you clearly see gi{raffe} in the image? Answer with yes or no."
    # The prompt's own "{class_name}" / "{prompt}" are not templated a second time.
    assert (
        rendered[9]
        == f"Given PROMPT: {prompt}. Does the image respect fully the prompt description? Answer with yes or no."
    )
    assert prompt in rendered[7]
    assert all(r.endswith(" Answer with yes or no.") for r in rendered)


Y, N, X = "yes", "no", "nan"


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        # polarity: Q1+ Q2- Q3+ Q4+ Q5+ Q6- Q7+ Q8+ Q9- Q10+
        ([Y, N, Y, Y, Y, N, Y, Y, N, Y], 10),  # the best possible image
        ([Y, Y, Y, Y, Y, Y, Y, Y, Y, Y], 7 - 3),  # 7 positives +1, 3 negatives -1
        ([N, N, N, N, N, N, N, N, N, N], 0 + 1 + 0 + 0 + 0 + 0 + 0 + 0 + 1 + 0),  # Q3 'no' voids Q4-Q7 (Q6)
        ([N, Y, N, Y, Y, Y, Y, N, Y, N], -2),  # Q4-Q7 voided: Q2 -1, Q9 -1
        ([X, X, X, X, X, X, X, X, X, X], 0),
        ([Y, N, X, Y, N, Y, Y, X, X, Y], 1 + 1 + 0 + 1 + 0 - 1 + 1 + 0 + 0 + 1),  # Q3 'nan' voids nothing
        ([Y, "maybe", Y, Y, "", Y, Y, Y, Y, Y], 1 + 0 + 1 + 1 + 0 - 1 + 1 + 1 - 1 + 1),  # unparseable -> 0
    ],
)
def test_score_eq1(qs, answers, expected):
    assert qs.score(answers) == expected


def test_paper_table1_row_under_eq1(qs):
    # Table 1, image 4: Q3 is not seen, so Q4-Q7 are 'Nan' (the paper's row shows Q7 = 1 and Q2 = 0 for a
    # 'no', which eq. 1 does not give: eq. 1 is what we implement).
    answers = [Y, N, N, Y, Y, Y, Y, Y, N, Y]
    assert qs.apply_dependencies(answers) == [Y, N, N, X, X, X, X, Y, N, Y]
    assert qs.score(answers) == 1 + 1 + 0 + 0 + 0 + 0 + 0 + 1 + 1 + 1


def test_dependency_chain_and_length_check():
    qs = QuestionSet.from_dict(
        {
            "questions": [
                {"id": "a", "text": "is {class_name} there?", "polarity": "positive"},
                {"id": "b", "text": "for {prompt}?", "polarity": "positive", "depends_on": "a"},
                {"id": "c", "text": "c?", "polarity": "negative", "depends_on": "b"},
            ]
        }
    )
    assert qs.apply_dependencies([N, Y, Y]) == [N, X, X]  # c depends on b, voided by a
    assert qs.apply_dependencies([Y, N, Y]) == [Y, N, X]
    assert qs.score([Y, Y, N]) == 3
    with pytest.raises(ValueError, match="got 2 answers for 3 questions"):
        qs.score([Y, Y])


def test_signed_p_yes(qs):
    p = [0.9, 0.2, 0.8, 0.7, 0.6, 0.1, 0.5, 0.4, 0.3, 0.95]
    expected = 0.9 - 0.2 + 0.8 + 0.7 + 0.6 - 0.1 + 0.5 + 0.4 - 0.3 + 0.95
    assert signed_p_yes(qs, p) == pytest.approx(expected)
    # Q3 answered 'no': Q4-Q7 are skipped.
    p_no = [0.9, 0.2, 0.3, 0.7, 0.6, 0.1, 0.5, 0.4, 0.3, 0.95]
    assert signed_p_yes(qs, p_no) == pytest.approx(0.9 - 0.2 + 0.3 + 0.4 - 0.3 + 0.95)
    answers = [Y, N, N, Y, Y, N, Y, N, N, Y]
    assert signed_p_yes(qs, p, answers) == pytest.approx(0.9 - 0.2 + 0.8 + 0.4 - 0.3 + 0.95)
    assert signed_p_yes(qs, [None] * 10) == 0.0


BASE = {
    "instruction": "Answer with yes or no.",
    "questions": [
        {"id": "Q1", "text": "Is there a {class_name}?", "polarity": "positive"},
        {"id": "Q2", "text": "Does it match {prompt}?", "polarity": "negative", "depends_on": "Q1"},
    ],
}


def _bad(tmp_path, mutate) -> str:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    mutate(data)
    path = tmp_path / "questions.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError) as info:
        QuestionSet.load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_base_is_valid(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert QuestionSet.load(path).ids == ["Q1", "Q2"]


def _set(i, key, value):
    def mutate(d):
        d["questions"][i][key] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (_set(0, "polarity", "neutral"), "question Q1: polarity must be positive or negative"),
        (_set(1, "depends_on", "Q9"), "question Q2: depends_on 'Q9' is not a question id"),
        (_set(1, "depends_on", "Q2"), "question Q2: depends_on names the question itself"),
        (_set(0, "depends_on", "Q2"), "cyclic depends_on"),
        (_set(1, "id", "Q1"), "question Q1: duplicate id"),
        (_set(0, "text", "Is there a cat?"), "no question mentions {class_name}"),
        (_set(1, "text", "Does it match?"), "no question mentions {prompt}"),
        (_set(0, "text", "Is there a {class}? {class_name}"), "question Q1: unknown placeholder {class}"),
        (_set(0, "weight", 2), "question Q1: unknown key 'weight'"),
        (_set(0, "text", ""), "question Q1: missing or empty 'text'"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
        (lambda d: d.update(questions=[]), "'questions' must be a non-empty list"),
        (lambda d: d["questions"][0].pop("id"), "question #1: missing or empty 'id'"),
    ],
)
def test_validation_errors(tmp_path, mutate, needle):
    assert needle in _bad(tmp_path, mutate)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ValueError, match="question file not found"):
        QuestionSet.load(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("questions: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        QuestionSet.load(broken)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("yes,", "yes"),
        ("**No**", "no"),
        ("Answer: yes", "yes"),
        ("answer - No", "no"),
        ("N/A", "nan"),
        ("nan", "nan"),
        ("Nan", "nan"),
        ("Yes, the image shows a giraffe.", "yes"),
        ("No - the animal has five legs", "no"),
        ('  "Yes"', "yes"),
        ("'no'", "no"),
        ("\n\n  YES!", "yes"),
        ("- No", "no"),
        ("No.\nThe image...", "no"),
        ("Nothing unusual.", "nan"),  # starts with "no" but is not an answer
        ("Yesterday", "nan"),
        ("I cannot tell.", "nan"),
        ("", "nan"),
        ("   ", "nan"),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected
