"""Outcome rewards: answer reward, search-key reward and the global score (METHOD.md §2b–d).

- r_ans = F1(ŷ, A) = max_{a∈A} tokenF1(norm(ŷ), norm(a)) (SQuAD), or EM as an option; 0 with no answer.
- r_key: for queries q_1..q_T in order, j* = argmax_j F1(q_t, K_j) (first j on ties); if that F1 > 0,
  s_{j*} ← F1 (``overwrite``, released) or s_{j*} ← max(s_{j*}, F1) (``max``). r_key = (1/m) Σ_j s_j,
  unmatched groups count 0; 0 with no queries or no keys. The released code rounded each F1 to 4
  decimals; we do not.
- R = r_ans + γ_key · r_key for a valid format (γ_key = 0.618, key term switchable), else −1. No
  format bonus, as released: StepSearch's scorer (``qa_step.py`` @43215ba) takes a ``format_score``
  argument but never uses it (and is passed 0). Only Search-R1's ``qa_em_format.py`` grades the tag
  structure (its ``structure_format_score``/``final_format_score``/``retrieval_score`` arguments);
  that is Search-R1's reward, not StepSearch's.

Departures from the released scorer (docs/method.md, "Departures from the released code"): r_key is
logged even when the format gate fails (released: 0.0; R = −1 in both), and the search-key groups are
those of :class:`~stepsearch.data.schema.Example`, which drops empty groups (released: used as given,
an empty group counts 0 in the mean).
"""

from __future__ import annotations

from collections.abc import Sequence

from stepsearch.evaluation.metrics import exact_match_score, f1_score


def answer_reward(prediction: str | None, golds: Sequence[str], metric: str = "f1") -> float:
    """r_ans: F1 (default) or EM of the prediction against the gold answers; 0.0 if no prediction."""
    if metric == "f1":
        return f1_score(prediction, golds)
    if metric == "em":
        return exact_match_score(prediction, golds)
    raise ValueError(f"answer metric must be 'f1' or 'em', got {metric!r}")


def search_key_reward(queries: Sequence[str], key_groups: Sequence[Sequence[str]], update: str = "overwrite") -> float:
    """r_key = mean_j s_j with s_{j*(q)} set by each query's best-matching key group (see module doc)."""
    if update not in ("overwrite", "max"):
        raise ValueError(f"key update must be 'overwrite' or 'max', got {update!r}")
    groups = [list(g) for g in key_groups]
    if not queries or not groups:
        return 0.0
    group_scores = [0.0] * len(groups)
    for query in queries:
        best_score, best_group = 0.0, -1
        for j, group in enumerate(groups):
            score = f1_score(query, group)
            if score > best_score:
                best_score, best_group = score, j
        if best_group < 0:
            continue
        if update == "overwrite":
            group_scores[best_group] = best_score
        else:
            group_scores[best_group] = max(group_scores[best_group], best_score)
    return sum(group_scores) / len(groups)


def global_score(
    format_ok: bool,
    answer_score: float,
    key_score: float,
    key_weight: float = 0.618,
    use_key: bool = True,
    format_penalty: float = -1.0,
) -> float:
    """R = r_ans + key_weight · r_key (key term only if ``use_key``) when the format is valid, else the penalty."""
    if not format_ok:
        return format_penalty
    return answer_score + (key_weight * key_score if use_key else 0.0)
