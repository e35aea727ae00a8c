"""The optimal image of a prompt (paper section 3) from hand-made records; no model is built."""

import subprocess
import sys

import pytest

from ccsr.questions import Question, QuestionSet
from ccsr.rundir import Candidate, Detection, Judgment, Pair, PromptRecord
from ccsr.selection import (
    BELOW_MIN_SCORE,
    NO_DETECTION,
    Choice,
    best_tied,
    by_prompt,
    choose_image,
    select_pairs,
)

QUESTIONS = QuestionSet(
    [
        Question("q1", "Is there a {class_name}?", "positive"),
        Question("q2", "Does it match '{prompt}'?", "positive"),
        Question("q3", "Is it blurry?", "negative"),
    ]
)


def judgment(index: int, score: int, p_yes=None, pid: str = "001-000") -> Judgment:
    answers = ["yes", "yes", "no"]
    return Judgment(pid, index, answers, score, p_yes)


def detection(index: int, confidence: float, score: int = 3, pid: str = "001-000") -> Detection:
    return Detection(pid, index, score, confidence)


def test_best_tied_keeps_every_image_at_the_best_score_in_order():
    js = [judgment(0, 2), judgment(1, 3), judgment(2, 1), judgment(3, 3), judgment(4, 3)]
    assert [j.index for j in best_tied(js)] == [1, 3, 4]
    assert [j.index for j in best_tied(js, "none", QUESTIONS)] == [1, 3, 4], "the paper: no tie-break"
    assert [j.index for j in best_tied([judgment(7, -3)])] == [7]
    assert best_tied([]) == []


def test_p_yes_tie_break_narrows_by_signed_probability():
    js = [
        judgment(0, 3, [0.9, 0.8, 0.1]),  # 0.9 + 0.8 - 0.1 = 1.6
        judgment(1, 3, [0.9, 0.9, 0.1]),  # 1.7: the most confident
        judgment(2, 3, [0.9, 0.9, 0.1]),  # 1.7: still tied
        judgment(3, 2, [1.0, 1.0, 0.0]),  # higher P(yes) but a lower score: never considered
    ]
    assert [j.index for j in best_tied(js, "p_yes", QUESTIONS)] == [1, 2]
    assert [j.index for j in best_tied(js[:1], "p_yes", QUESTIONS)] == [0], "one image needs no tie-break"
    with pytest.raises(ValueError, match="question set"):
        best_tied(js, "p_yes")


def test_threshold_is_inclusive():
    assert choose_image([detection(0, 0.6)], 0.6) == Choice(detection(0, 0.6))
    assert choose_image([detection(0, 0.599999)], 0.6) == Choice(None, NO_DETECTION)
    assert choose_image([], 0.6) == Choice(None, NO_DETECTION)


def test_highest_confidence_wins_and_ties_go_to_the_lowest_index():
    ds = [detection(4, 0.7), detection(2, 0.9), detection(1, 0.5), detection(3, 0.9)]
    assert choose_image(ds, 0.6).detection.index == 2
    assert choose_image(ds, 0.95).reason == NO_DETECTION


def test_min_score_cuts_prompts_whose_best_image_is_not_good_enough():
    ds = [detection(0, 0.9, score=1), detection(1, 0.8, score=1)]
    assert choose_image(ds, 0.6, min_score=2) == Choice(None, BELOW_MIN_SCORE)
    assert choose_image(ds, 0.6, min_score=1).detection.index == 0, "exactly min_score passes"
    assert choose_image(ds, 0.6, min_score=None).detection.index == 0
    # No confident detection: counted as that, whatever the score.
    assert choose_image([detection(0, 0.1, score=0)], 0.6, min_score=5).reason == NO_DETECTION


def test_select_pairs_forms_one_pair_per_prompt_and_says_why_not():
    prompts = [PromptRecord(f"001-00{i}", f"a giraffe {i}", "giraffe") for i in range(4)]
    candidates = [
        Candidate(p.id, j, 100 + j, f"iterations/001/candidates/{p.id}-{j:02d}.png")
        for p in prompts
        for j in range(3)
    ]
    detections = [
        detection(0, 0.7, 4, "001-000"),
        detection(2, 0.8, 4, "001-000"),
        detection(1, 0.3, 4, "001-001"),  # not found
        detection(1, 0.99, 0, "001-002"),  # found, but the best score is below min_score
    ]  # 001-003: no detections at all (e.g. no judgments)
    sel = select_pairs(prompts, candidates, detections, 0.6, min_score=1)
    assert sel.pairs == [
        Pair("001-000", 2, "a giraffe 0", "iterations/001/candidates/001-000-02.png", 4, 0.8)
    ]
    assert sel.no_pair == {"001-001": NO_DETECTION, "001-002": BELOW_MIN_SCORE, "001-003": NO_DETECTION}
    assert (sel.count(NO_DETECTION), sel.count(BELOW_MIN_SCORE)) == (2, 1)
    assert select_pairs(prompts, candidates, detections, 0.6).count(BELOW_MIN_SCORE) == 0
    empty = select_pairs([], [], [], 0.6)
    assert empty.pairs == [] and empty.no_pair == {}


def test_by_prompt_groups_in_file_order():
    js = [judgment(0, 1, pid="b"), judgment(0, 1, pid="a"), judgment(1, 1, pid="b")]
    grouped = by_prompt(js)
    assert list(grouped) == ["b", "a"] and [j.index for j in grouped["b"]] == [0, 1]


def test_the_rule_modules_import_no_torch():
    code = "import sys, ccsr.selection, ccsr.gate; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
