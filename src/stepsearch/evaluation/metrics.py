"""Answer metrics: SQuAD v1.1 exact match and token F1, as functions and as torchmetrics Metrics.

``normalize_answer`` is the SQuAD v1.1 normalisation (lowercase, drop ASCII punctuation, drop the
words a/an/the, collapse whitespace). ``exact_match_score`` and ``f1_score`` take the max over the
gold answers (answer + aliases). They reproduce ``scores.squad_v1.1`` of all 99 cases of
``shared/data/metrics/answer_metric_cases.jsonl``; other official scripts differ as follows:

- empty after normalisation (``"The The"`` vs ``"The The"``, ``"an"`` vs ``"a"``, ``"*"`` vs ``"*"``):
  SQuAD, HotpotQA, 2Wiki, FlashRAG and StepSearch give EM 1, F1 0 (no common token); the MuSiQue
  script gives F1 1. We follow SQuAD.
- yes/no/noanswer: HotpotQA, 2Wiki and FlashRAG set F1 to 0 when either normalised side is
  ``yes``/``no``/``noanswer`` and they differ (``"yes"`` vs ``"yes indeed"``: SQuAD F1 0.667, theirs 0).
- HotpotQA's ``em``/``f1`` score only the first gold (its ``*_max`` fields take the max, like us).
- StepSearch's evaluation strips ``\\boxed{...}`` before scoring (``\\boxed{Paris}`` → EM 1); SQuAD
  does not (EM 0). Search-R1/FlashRAG ``subem`` is substring match, a different metric.
- Non-ASCII punctuation and accents are kept by every script (``“Hello”`` ≠ ``Hello``, ``Café`` ≠ ``Cafe``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch
from torchmetrics import Metric

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop ASCII punctuation, drop a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(golds: str | Sequence[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str | None, golds: str | Sequence[str]) -> float:
    """max_g [norm(prediction) == norm(g)]; 0.0 with no prediction or no golds."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _as_list(golds)))


def f1_score(prediction: str | None, golds: str | Sequence[str]) -> float:
    """max_g bag-of-tokens F1(norm(prediction), norm(g)) (SQuAD v1.1); 0 if no common token."""
    if prediction is None:
        return 0.0
    pred_tokens = normalize_answer(prediction).split()
    return max((_token_f1(pred_tokens, normalize_answer(g).split()) for g in _as_list(golds)), default=0.0)


class _MeanAnswerMetric(Metric):
    """Mean of a per-example answer score; sum/count states reduce by sum across processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _score(prediction: str | None, golds: Sequence[str]) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, preds: Sequence[str | None], golds: Sequence[str | Sequence[str]]) -> None:
        """Add a batch: ``preds[i]`` (None = no answer, scores 0) against the gold list ``golds[i]``."""
        if len(preds) != len(golds):
            raise ValueError(f"{type(self).__name__}.update: {len(preds)} predictions but {len(golds)} gold lists")
        batch_total = sum(self._score(p, _as_list(g)) for p, g in zip(preds, golds))
        self.total += batch_total
        self.count += len(preds)

    def compute(self) -> torch.Tensor:
        """Mean score over every example seen (0.0 before any update)."""
        return (self.total / self.count.clamp_min(1)).float()


class ExactMatch(_MeanAnswerMetric):
    """Mean SQuAD exact match over examples (max over gold aliases)."""

    @staticmethod
    def _score(prediction: str | None, golds: Sequence[str]) -> float:
        return exact_match_score(prediction, golds)


class TokenF1(_MeanAnswerMetric):
    """Mean SQuAD token F1 over examples (max over gold aliases)."""

    @staticmethod
    def _score(prediction: str | None, golds: Sequence[str]) -> float:
        return f1_score(prediction, golds)


__all__ = ["normalize_answer", "exact_match_score", "f1_score", "ExactMatch", "TokenF1"]
