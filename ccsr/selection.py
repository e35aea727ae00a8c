"""Which images of a prompt become training data: the filter rule of paper section 3, over typed records.

The rules are the config's ``filter`` section. Per prompt: the images tied at the best eq. (1) score
(optionally narrowed by the signed P(yes) tie-break, ``filter.tie_break: p_yes``, not in the paper) go to the
detector; of those, the optimal image is the one with the highest detector confidence at or above
``filter.detection_threshold`` (paper: 0.6), ties broken by the lowest candidate index. A prompt whose best
score is below ``filter.min_score`` (not in the paper) yields no pair either.

``filter.top_k`` > 1 (not in the paper) keeps up to k images per prompt: the candidates ranked by score, then
(with the p_yes tie-break) signed P(yes), then passing the detector, then detector confidence, then lowest
index; of the first k, those that pass the detector and ``min_score``. The first of that ranking is the
paper's optimal image, so k = 1 is the paper's rule exactly.

Preference pairs (Diffusion-DPO's data) pair each selected image (winner) with a strictly lower-scored
candidate of the same prompt (loser): the lowest-scored one not yet used, never a tie.

Pure rules: no torch, no model, no files. The filter stage runs the detector on ``best_tied`` images (on
every candidate when k > 1) and commits the detections; ``select_pairs`` then turns records into pairs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ccsr.records import Candidate, Detection, Judgment, Pair, Preference, PromptRecord

if TYPE_CHECKING:
    from ccsr.questions import QuestionSet

# Why a prompt yields no pair (counted by the filter stage).
NO_DETECTION = "no_detection"  # no best-scored image has a detection at or above the threshold
BELOW_MIN_SCORE = "below_min_score"  # the best eq. 1 score is below filter.min_score

T = TypeVar("T", Judgment, Detection, Candidate)


def by_prompt(records: Iterable[T]) -> dict[str, list[T]]:
    """Records grouped by prompt id, in file order."""
    out: dict[str, list[T]] = {}
    for r in records:
        out.setdefault(r.prompt_id, []).append(r)
    return out


def best_tied(judgments: list[Judgment], tie_break: str = "none", questions: QuestionSet | None = None):
    """The judgments of one prompt tied at its best eq. (1) score (paper section 3), in their given order.

    With ``tie_break="p_yes"`` (``questions`` required) several tied images are narrowed to those with the
    highest polarity-signed sum of P(yes) (``ccsr.questions.signed_p_yes``).
    """
    if not judgments:
        return []
    best = max(j.score for j in judgments)
    tied = [j for j in judgments if j.score == best]
    if tie_break == "p_yes" and len(tied) > 1:
        from ccsr.questions import signed_p_yes

        if questions is None:
            raise ValueError("tie_break 'p_yes' needs the question set")
        keyed = [(signed_p_yes(questions, j.p_yes, j.answers), j) for j in tied]
        top = max(v for v, _ in keyed)
        tied = [j for v, j in keyed if v == top]
    return tied


@dataclass(frozen=True)
class Choice:
    """A prompt's optimal image (``detection``), or None and ``reason`` (NO_DETECTION, BELOW_MIN_SCORE)."""

    detection: Detection | None
    reason: str | None = None
    chosen: tuple[Detection, ...] = ()  # every kept image, best first (``top_k``; ``detection`` is the first)


def choose_image(detections: list[Detection], threshold: float, min_score: int | None = None) -> Choice:
    """The optimal image of one prompt from the detector's confidences on its best-tied images.

    Highest confidence >= ``threshold`` (exactly the threshold passes), ties broken by the lowest index. The
    detections all carry the prompt's best score, so ``min_score`` is checked against it.
    """
    passing = [d for d in detections if d.confidence >= threshold]
    if not passing:
        return Choice(None, NO_DETECTION)
    if min_score is not None and passing[0].score < min_score:
        return Choice(None, BELOW_MIN_SCORE)
    return Choice(max(passing, key=lambda d: (d.confidence, -d.index)))


@dataclass
class Selection:
    """The pairs of one iteration, and why each prompt without one has none (prompt id -> reason)."""

    pairs: list[Pair]
    no_pair: dict[str, str] = field(default_factory=dict)

    def count(self, reason: str) -> int:
        return sum(r == reason for r in self.no_pair.values())


def rank(
    judgments: list[Judgment],
    detections: list[Detection],
    threshold: float,
    tie_break: str = "none",
    questions: QuestionSet | None = None,
) -> list[Detection]:
    """A prompt's detected candidates, best first (see the module docstring). Candidates without a
    detection (the detector only saw the best-tied ones) are left out."""
    signed = {}
    if tie_break == "p_yes":
        from ccsr.questions import signed_p_yes

        if questions is None:
            raise ValueError("tie_break 'p_yes' needs the question set")
        signed = {j.index: signed_p_yes(questions, j.p_yes, j.answers) for j in judgments}

    def key(d: Detection):
        return (-d.score, -signed.get(d.index, 0.0), d.confidence < threshold, -d.confidence, d.index)

    return sorted(detections, key=key)


def top_k(ranked: list[Detection], k: int, threshold: float, min_score: int | None = None) -> Choice:
    """Of the first ``k`` ranked candidates, those passing the detector and ``min_score``; for k = 1 the
    same image (and the same reason for none) as ``choose_image``."""
    head = ranked[:k]
    passing = [d for d in head if d.confidence >= threshold]
    if not passing:
        return Choice(None, NO_DETECTION)
    kept = [d for d in passing if min_score is None or d.score >= min_score]
    if not kept:
        return Choice(None, BELOW_MIN_SCORE)
    return Choice(kept[0], chosen=tuple(kept))


def select_pairs(
    prompts: list[PromptRecord],
    candidates: list[Candidate],
    detections: list[Detection],
    threshold: float,
    min_score: int | None = None,
    k: int = 1,
    judgments: list[Judgment] | None = None,
    tie_break: str = "none",
    questions: QuestionSet | None = None,
) -> Selection:
    """Up to ``k`` pairs per prompt that has an optimal image, in prompt order. For k = 1 the detections
    are the best-tied images' and the first of their ranking is ``choose_image``'s: the paper's rule."""
    paths = {(c.prompt_id, c.index): c.path for c in candidates}
    grouped = by_prompt(detections)
    judged = by_prompt(judgments or [])
    selection = Selection(pairs=[])
    for p in prompts:
        ranked = rank(judged.get(p.id, []), grouped.get(p.id, []), threshold, tie_break, questions)
        choice = top_k(ranked, k, threshold, min_score)
        if choice.detection is None:
            selection.no_pair[p.id] = choice.reason
            continue
        selection.pairs += [
            Pair(p.id, d.index, p.prompt, paths[(p.id, d.index)], d.score, d.confidence)
            for d in choice.chosen
        ]
    return selection


def preference_pairs(
    pairs: list[Pair], candidates: list[Candidate], judgments: list[Judgment]
) -> list[Preference]:
    """Each selected image (winner) with the lowest-scored candidate of its prompt that scored strictly
    lower and is not yet a loser of that prompt (ties: lowest index); a winner without one gets none."""
    paths = {(c.prompt_id, c.index): c.path for c in candidates}
    judged = by_prompt(judgments)
    used: dict[str, set[int]] = {}
    out = []
    for w in pairs:
        taken = used.setdefault(w.prompt_id, set())
        lower = [j for j in judged.get(w.prompt_id, []) if j.score < w.score and j.index not in taken]
        if not lower:
            continue
        loser = min(lower, key=lambda j: (j.score, j.index))
        taken.add(loser.index)
        out.append(
            Preference(
                prompt_id=w.prompt_id,
                prompt=w.prompt,
                winner_index=w.index,
                loser_index=loser.index,
                winner_path=w.path,
                loser_path=paths[(w.prompt_id, loser.index)],
                winner_score=w.score,
                loser_score=loser.score,
            )
        )
    return out
