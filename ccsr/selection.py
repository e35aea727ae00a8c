"""Which image of a prompt becomes training data: the filter rule of paper section 3, over typed records.

Per prompt: the images tied at the best eq. (1) score (optionally narrowed by the signed P(yes) tie-break,
``judge.tie_break: p_yes``, not in the paper) go to the detector; of those, the optimal image is the one with
the highest detector confidence at or above the threshold (paper: 0.6), ties broken by the lowest candidate
index. A prompt whose best score is below ``judge.min_score`` (not in the paper) yields no pair either.

Pure rules: no torch, no model, no files. The filter stage runs the detector on ``best_tied`` images and
commits the detections; ``select_pairs`` then turns records into pairs. Preference pairs (a winner and a
loser of one prompt) are formed from the same per-prompt records, beside ``choose_image``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ccsr.rundir import Candidate, Detection, Judgment, Pair, PromptRecord

if TYPE_CHECKING:
    from ccsr.questions import QuestionSet

# Why a prompt yields no pair (counted by the filter stage).
NO_DETECTION = "no_detection"  # no best-scored image has a detection at or above the threshold
BELOW_MIN_SCORE = "below_min_score"  # the best eq. 1 score is below judge.min_score

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


def select_pairs(
    prompts: list[PromptRecord],
    candidates: list[Candidate],
    detections: list[Detection],
    threshold: float,
    min_score: int | None = None,
) -> Selection:
    """One pair per prompt that has an optimal image, in prompt order."""
    paths = {(c.prompt_id, c.index): c.path for c in candidates}
    grouped = by_prompt(detections)
    selection = Selection(pairs=[])
    for p in prompts:
        choice = choose_image(grouped.get(p.id, []), threshold, min_score)
        if choice.detection is None:
            selection.no_pair[p.id] = choice.reason
            continue
        d = choice.detection
        selection.pairs.append(
            Pair(
                prompt_id=p.id,
                index=d.index,
                prompt=p.prompt,
                path=paths[(p.id, d.index)],
                score=d.score,
                confidence=d.confidence,
            )
        )
    return selection
