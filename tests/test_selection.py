"""The optimal image of a prompt (paper section 3) from hand-made records; no model is built."""

import random
import subprocess
import sys

import pytest

from ccsr.questions import Question, QuestionSet
from ccsr.records import Candidate, Detection, Judgment, Pair, PromptRecord
from ccsr.selection import (
    BELOW_MIN_SCORE,
    NO_DETECTION,
    Choice,
    best_tied,
    by_prompt,
    choose_image,
    preference_pairs,
    rank,
    select_pairs,
    top_k,
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


def _random_prompt(rng: random.Random, n: int = 10):
    js = [judgment(i, rng.randint(6, 10)) for i in range(n)]
    ds = [detection(j.index, rng.choice([0.0, 0.3, 0.6, 0.61, 0.9, 0.9]), j.score) for j in js]
    return js, ds


def test_top_1_is_the_papers_rule_on_random_prompts():
    rng = random.Random(0)
    for _ in range(500):
        js, ds = _random_prompt(rng)
        min_score = rng.choice([None, 8, 10])
        tied = {j.index for j in best_tied(js)}
        paper = choose_image([d for d in ds if d.index in tied], 0.6, min_score)
        ranked = rank(js, ds, 0.6)
        assert top_k(ranked, 1, 0.6, min_score) == Choice(
            paper.detection, paper.reason, ((paper.detection,) if paper.detection else ())
        )


def test_top_k_keeps_the_k_best_that_pass_detector_and_min_score():
    js = [judgment(0, 10), judgment(1, 9), judgment(2, 10), judgment(3, 7), judgment(4, 9)]
    ds = [
        detection(0, 0.7, 10),
        detection(1, 0.9, 9),
        detection(2, 0.5, 10),
        detection(3, 0.9, 7),
        detection(4, 0.8, 9),
    ]
    ranked = rank(js, ds, 0.6)
    # score first; within a score, passing the detector before failing, then confidence
    assert [d.index for d in ranked] == [0, 2, 1, 4, 3]
    assert [d.index for d in top_k(ranked, 3, 0.6).chosen] == [0, 1]  # 2 fails the detector
    assert [d.index for d in top_k(ranked, 5, 0.6, min_score=8).chosen] == [0, 1, 4]
    assert top_k(ranked, 5, 0.95).reason == NO_DETECTION
    assert top_k(rank(js, ds, 0.0), 5, 0.0, min_score=11).reason == BELOW_MIN_SCORE


def test_select_pairs_top_k_several_pairs_per_prompt():
    prompts = [PromptRecord("001-000", "a red circle", "circle")]
    cands = [Candidate("001-000", i, i, f"c/{i}.png", "", None, 0.0) for i in range(4)]
    js = [judgment(0, 10), judgment(1, 9), judgment(2, 10), judgment(3, 7)]
    ds = [detection(j.index, 0.9, j.score) for j in js]
    sel = select_pairs(prompts, cands, ds, 0.6, k=3, judgments=js)
    assert [(p.index, p.score, p.path) for p in sel.pairs] == [
        (0, 10, "c/0.png"),
        (2, 10, "c/2.png"),
        (1, 9, "c/1.png"),
    ]
    # every judged candidate, weighted by its score: top_k = N, detector threshold 0
    all_of_them = select_pairs(
        prompts, cands, [detection(j.index, 0.0, j.score) for j in js], 0.0, k=4, judgments=js
    )
    assert sorted((p.index, p.score) for p in all_of_them.pairs) == [(0, 10), (1, 9), (2, 10), (3, 7)]


def test_preference_pairs_never_tie_and_take_the_lowest_loser_first():
    cands = [Candidate("001-000", i, i, f"c/{i}.png", "", None, 0.0) for i in range(5)]
    js = [judgment(0, 10), judgment(1, 10), judgment(2, 8), judgment(3, 6), judgment(4, 6)]
    winners = [
        Pair("001-000", 0, "p", "c/0.png", 10, 0.9),
        Pair("001-000", 1, "p", "c/1.png", 10, 0.9),
        Pair("001-000", 2, "p", "c/2.png", 8, 0.9),
    ]
    prefs = preference_pairs(winners, cands, js)
    got = [(p.winner_index, p.loser_index, p.winner_score, p.loser_score) for p in prefs]
    # winner 2 (score 8) has only 3 and 4 below it, both used: no pair for it
    assert got == [(0, 3, 10, 6), (1, 4, 10, 6)]
    assert all(p.winner_score > p.loser_score for p in prefs)
    assert prefs[0].loser_path == "c/3.png"
    tied = [judgment(0, 9), judgment(1, 9)]
    assert preference_pairs([Pair("001-000", 0, "p", "c/0.png", 9, 0.9)], cands, tied) == []
