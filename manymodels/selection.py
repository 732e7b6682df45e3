"""Choosing on validation folds: candidates within a segment, and levels across segments.

Both choices use the one-standard-error rule (Breiman et al. 1984; Hastie, Tibshirani &
Friedman, *ESL* §7.10): among the options whose mean fold metric is within one standard
error of the best, take the simplest. On a segment of a few dozen rows the fold metrics
are noisy, and the rule stops a flexible model (or a segment's own model) from winning
on noise. Options are always listed simplest first.

- Candidates: mean < ridge / logistic < decision tree < random forest < LightGBM
  (declaration order within a family).
- Levels of one segment: global < pool(s) < own. Where no level wins outright (the
  best by mean beating every other level by more than one standard error of the paired
  fold differences), the blend ``w · own + (1 − w) · coarser`` with the best mean fold
  metric (w in 0.25, 0.5, 0.75; coarser = the best coarser level) replaces the chosen
  level if it beats it: shrinking a segment's model toward a coarser one is partial
  pooling.

How sure a choice was (``margin_se``) is a paired comparison: every option is scored on
the same folds, so the standard error that says whether A beats B is that of the
per-fold differences A − B (as in a paired t-test), not the spread of A's own fold
metrics, which mixes in how much the folds differ from each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from manymodels.candidates import higher_is_better, score_metric
from manymodels.runtime.scoring import blend_outputs

__all__ = ["BLEND_WEIGHTS", "SIMPLICITY", "Choice", "FoldScores", "LevelChoice", "choose_level",
           "choose_route", "option_label", "paired_difference", "pick", "score_folds"]

#: Complexity rank of each algorithm: the one-SE rule prefers lower ranks.
SIMPLICITY = {"mean": 0, "ridge": 1, "logistic": 1, "decision_tree": 2, "random_forest": 3,
              "hist_gradient_boosting": 4, "lightgbm": 4}

#: Weights of a segment's own model in the blends the gate considers (0 and 1 are the
#: pure levels themselves).
BLEND_WEIGHTS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class FoldScores:
    """One option's metric on each validation fold, with their mean and standard error.

    ``folds`` names the fold of each value (positions when not given), so two options'
    values can be paired fold by fold.
    """

    values: tuple[float, ...]
    folds: tuple[int, ...] | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def se(self) -> float:
        """Standard error of the mean over folds (0 with a single fold)."""
        return _standard_error(self.values)

    @property
    def fold_ids(self) -> tuple[int, ...]:
        return self.folds if self.folds is not None else tuple(range(len(self.values)))

    def as_dict(self) -> dict[str, Any]:
        return {"folds": [float(v) for v in self.values], "mean": self.mean, "se": self.se}


def _standard_error(values: Sequence[float]) -> float:
    k = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(k)) if k > 1 else 0.0


def paired_difference(a: FoldScores, b: FoldScores) -> tuple[float, float] | None:
    """Mean and standard error of ``a − b`` over the folds both were scored on.

    Every option of a segment is scored on the same folds, so their fold metrics move
    together (a hard fold is hard for every model). The spread of the per-fold
    differences measures how consistently one beats the other; the spread of one
    option's own fold metrics mostly measures how much the folds differ. ``None``
    when the two share no fold.
    """
    of_b = dict(zip(b.fold_ids, b.values, strict=True))
    diffs = [v - of_b[f] for f, v in zip(a.fold_ids, a.values, strict=True) if f in of_b]
    if not diffs:
        return None
    return float(np.mean(diffs)), _standard_error(diffs)


def _usable(score: FoldScores | None) -> bool:
    return score is not None and bool(score.values) and math.isfinite(score.mean)


@dataclass(frozen=True)
class Choice:
    """The option picked, the best one by mean, and how sure the pick was.

    ``margin_se``: the smallest, over the other options, of the picked option's mean
    advantage divided by the standard error of the paired fold differences; positive
    when it is better than all of them, above 1 when it wins by more than one standard
    error. ``None`` when that cannot be said (one fold, or no other option).
    """

    index: int | None
    best: int | None
    margin_se: float | None


def pick(options: Sequence[FoldScores | None], metric: str, rule: str = "one_se") -> Choice:
    """Index of the option to take among ``options`` listed simplest first.

    ``rule`` ``one_se``: the simplest option whose mean is within one standard error
    (of the best option's fold metrics, as in *ESL* §7.10) of the best mean; ``best``:
    the best mean (ties go to the simpler option). Unusable options (``None``, no
    folds, non-finite mean) are never picked. How sure the pick was (``margin_se``) is
    measured on the paired fold differences (:func:`paired_difference`).
    """
    sign = -1.0 if higher_is_better(metric) else 1.0  # lower signed mean is better
    usable = [i for i, s in enumerate(options) if _usable(s)]
    if not usable:
        return Choice(None, None, None)
    scores: dict[int, FoldScores] = {i: s for i, s in enumerate(options) if i in usable
                                     and s is not None}
    means = {i: sign * scores[i].mean for i in usable}
    best = min(usable, key=lambda i: (means[i], i))
    chosen = best
    if rule == "one_se":
        unit = scores[best].se
        chosen = next(i for i in usable if means[i] <= means[best] + unit + 1e-12)
    return Choice(chosen, best, _margin(scores, chosen, sign))


def _margin(scores: dict[int, FoldScores], chosen: int, sign: float) -> float | None:
    """The picked option's smallest advantage over any other, in paired standard errors.

    The one-SE rule is a parsimony rule and uses the best option's spread over folds;
    whether one option *beats* another is a comparison on shared folds, and the spread
    of one option's fold metrics says little about it: when two options' fold metrics
    move in opposite directions (each wins a different fold) it understates the
    uncertainty of their difference, when they move together it overstates it.
    """
    margins = []
    for i, other in scores.items():
        if i == chosen:
            continue
        paired = paired_difference(other, scores[chosen])
        if paired is None or paired[1] <= 0:
            continue
        margins.append(sign * paired[0] / paired[1])
    return min(margins) if margins else None


def score_folds(metric: str, truth: np.ndarray, prediction: np.ndarray, fold_of: np.ndarray,
                proba: np.ndarray | None = None, classes: np.ndarray | None = None
                ) -> FoldScores:
    """The metric on each fold present in ``fold_of`` (one fold id per held-out row)."""
    values = []
    for fold in np.unique(fold_of).tolist():
        rows = fold_of == fold
        values.append(score_metric(metric, truth[rows], prediction[rows],
                                   None if proba is None else proba[rows], classes))
    return FoldScores(tuple(values), tuple(int(f) for f in np.unique(fold_of).tolist()))


def choose_level(metrics: list[float | None], metric: str, min_gain: float) -> int | None:
    """Index of the level to serve a segment from (0 = its own model), by ``min_gain``.

    ``metrics`` go from finest (own) to coarsest (global); ``None`` means no model at
    that level. The coarsest available model is the default, and a finer one replaces it
    only when it is better by more than ``min_gain`` (relative), because fewer models
    are cheaper to serve and less likely to overfit.
    """
    available = [i for i, m in enumerate(metrics) if m is not None and np.isfinite(m)]
    if not available:
        return None
    best = available[-1]
    sign = 1.0 if higher_is_better(metric) else -1.0
    for level in reversed(available[:-1]):
        candidate, current = metrics[level], metrics[best]
        assert candidate is not None and current is not None
        gain = sign * (candidate - current) / max(abs(current), 1e-12)
        if gain > min_gain:
            best = level
    return best


@dataclass
class LevelChoice:
    """Where one segment is served from: a level, or a blend of its own model and one
    coarser level, with every option's fold scores."""

    level: int | None  # 0 = own, then coarser; None = no usable level
    blend_with: int | None = None  # coarser level blended with the own model
    weight: float = 1.0  # weight of the own model in the blend
    margin_se: float | None = None
    scores: dict[str, FoldScores] = field(default_factory=dict)


def _label(level: int, count: int) -> str:
    if level == 0:
        return "own"
    if level == count - 1:
        return "global"
    return "pool" if count == 3 else f"pool{level}"


def option_label(choice: LevelChoice, count: int) -> str | None:
    """The key of ``choice`` in its :attr:`LevelChoice.scores` (``count`` levels)."""
    if choice.level is None:
        return None
    if choice.blend_with is not None:
        return f"blend {choice.weight:g}"
    return _label(choice.level, count)


def blend_predictions(own: np.ndarray, coarser: np.ndarray, weight: float) -> np.ndarray:
    """``weight · own + (1 − weight) · coarser``, as the scoring runtime computes it."""
    return blend_outputs(own, coarser, weight)


Prediction = tuple[np.ndarray, "np.ndarray | None"]


def choose_route(truth: np.ndarray, fold_of: np.ndarray, predictions: Sequence[Prediction | None],
                 metric: str, rule: str = "one_se", min_gain: float = 0.02,
                 blend: bool = False, classes: np.ndarray | None = None) -> LevelChoice:
    """Pick one segment's level (or blend) from its held-out rows' predictions per level.

    ``predictions[i]`` is level ``i``'s (predictions, class probabilities) of the
    segment's held-out rows (``truth``, fold ids ``fold_of``), finest first; ``None``
    where a level has no model. Only rows every available level predicted are compared.
    With ``one_se`` the coarsest level within one standard error of the best wins; when
    no level wins outright, the best blend of own and the best coarser level (regression
    only) replaces it if its mean is better. With ``min_gain`` see :func:`choose_level`.
    """
    count = len(predictions)
    rows = np.ones(len(truth), dtype=bool)
    for p in predictions:
        if p is not None:
            rows &= np.asarray(pd.notna(p[0]), dtype=bool)
    truth, fold_of = truth[rows], fold_of[rows]
    preds: list[Prediction | None] = [
        None if p is None else (p[0][rows], None if p[1] is None else p[1][rows])
        for p in predictions]

    def folds_of(p: Prediction) -> FoldScores:
        return score_folds(metric, truth, p[0], fold_of, p[1], classes)

    scores = [None if p is None or not len(truth) else folds_of(p) for p in preds]
    labelled = {_label(i, count): s for i, s in enumerate(scores) if s is not None}
    if rule == "min_gain":
        totals: list[float | None] = [
            None if p is None or not len(truth)
            else score_metric(metric, truth, p[0], p[1], classes) for p in preds]
        return LevelChoice(choose_level(totals, metric, min_gain), scores=labelled)
    # simplest first: coarsest level ... finest coarser level, own
    order = [*range(count - 1, 0, -1), 0]
    choice = pick([scores[i] for i in order], metric, "one_se")
    if choice.index is None:
        return LevelChoice(None, scores=labelled)
    level = order[choice.index]
    outright = (choice.index == choice.best and choice.margin_se is not None
                and choice.margin_se > 1.0)
    own, coarser = preds[0], _best_coarser(scores, metric)
    if outright or not blend or own is None or own[1] is not None or coarser is None:
        return LevelChoice(level, None, 1.0, choice.margin_se, labelled)
    # neither level wins outright: the blend weight with the best mean fold metric,
    # taken when it beats the level the one-SE rule chose
    partner = preds[coarser]
    assert partner is not None
    sign = -1.0 if higher_is_better(metric) else 1.0
    best_weight, best_mean = None, sign * scores[level].mean  # type: ignore[union-attr]
    for weight in BLEND_WEIGHTS:
        score = folds_of((blend_predictions(own[0], partner[0], weight), None))
        labelled[f"blend {weight:g}"] = score
        if math.isfinite(score.mean) and sign * score.mean < best_mean:
            best_weight, best_mean = weight, sign * score.mean
    if best_weight is None:
        return LevelChoice(level, None, 1.0, choice.margin_se, labelled)
    return LevelChoice(0, coarser, best_weight, choice.margin_se, labelled)


def _best_coarser(scores: Sequence[FoldScores | None], metric: str) -> int | None:
    """The coarser level with the best mean fold metric (the blend partner)."""
    sign = -1.0 if higher_is_better(metric) else 1.0
    usable = [i for i in range(1, len(scores)) if _usable(scores[i])]
    if not usable:
        return None
    return min(usable, key=lambda i: sign * scores[i].mean)  # type: ignore[union-attr]
