"""Step-wise process rewards: information gain and redundancy penalty (METHOD.md §2e, §2f).

Information gain. For golden paragraphs g_1..g_n and the bodies D_t retrieved at search step t
(titles not used): c_t[i] = max_{d∈D_t} sim(d, g_i); memory M_0 = 0, M_t = max(M_{t−1}, c_t)
elementwise; IG_t = (1/n) Σ_i max(c_t[i] − M_{t−1}[i], 0). Since max(c_t − M_{t−1}, 0) = M_t − M_{t−1},
the gains telescope: Σ_t IG_t = mean(M_T) ≤ 1.

sim (released): TF-IDF cosine of the SQuAD-normalised texts, where the IDF for a pair (d, g) is fitted
on the documents {d} ∪ G — one scikit-learn ``TfidfVectorizer()`` per retrieved passage, with its
defaults: tokens ``(?u)\\b\\w\\w+\\b`` (two or more word characters), raw counts (no sublinear tf),
smooth idf(v) = ln((1+N)/(1+df(v))) + 1 with N = n + 1, rows L2-normalised; negatives clipped to 0.
We compute all pairs at once instead. With df_G(v) the number of golden paragraphs containing v,
idf for the fit of d is b(v) = ln((N+1)/(2+df_G(v))) + 1 if v ∈ d, else a(v) = ln((N+1)/(1+df_G(v))) + 1.
With counts x_d, y_g:

    sim(d, g) = Σ_v x_d(v) y_g(v) b(v)² / (‖x_d ∘ b‖ · ‖y_g ∘ idf_d‖),
    ‖y_g ∘ idf_d‖² = Σ_v y_g(v)² a(v)² + Σ_{v∈d} y_g(v)² (b(v)² − a(v)²),

i.e. three sparse matrix products over a vocabulary shared by the trajectory. An empty passage (or a
pair without any token) has similarity 0, as in the released code (which would raise on an empty
vocabulary). Option: cosine of dense embeddings from an ``embed(texts) -> ndarray`` callable (raw
texts, not normalised: encoders are trained on natural text), clipped at 0.

Redundancy penalty: RP_t = |{d ∈ D_t : d already retrieved earlier}| / |D_t|, where "earlier" covers
earlier steps and earlier positions in the same step, and passages are identified by id when they
have one, else by text (the released code compared texts only).

Where the passages come from (``RewardConfig.passage_source``): ours are the clean texts the
retriever returned (``SearchStep.passage_texts``). The released scorer instead read them back out of
the response text (:func:`passages_from_response`), and its parser leaves ``"\\nDoc k+1"`` on every
passage but the last of each search: information gain then differs (up to 0.079 measured) and a
passage repeated at another rank is not recognised (``"B\\nDoc 3"`` ≠ ``"B\\nDoc 2"``). Given the
same texts, both compute the same numbers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from stepsearch.evaluation.metrics import normalize_answer

if TYPE_CHECKING:
    from stepsearch.rollout.trajectory import SearchStep

# scikit-learn's default token_pattern for TfidfVectorizer / CountVectorizer.
_TOKEN = re.compile(r"(?u)\b\w\w+\b")

EmbedFn = Callable[[list[str]], np.ndarray]

# A search and the observation right after it, as the released scorer found them.
_SEARCH_AND_INFORMATION = re.compile(r"<search>.*?</search>\s*<information>(.*?)</information>", re.DOTALL)


def passages_from_response(response_text: str) -> list[list[str]]:
    """The passages of each search as the released StepSearch scorer reads them from the response.

    For every ``<search>…</search>`` followed (after whitespace only) by ``<information>…</information>``:
    the block's content, stripped, is cut at every ``##>`` (the end of a ``<## Title: … ##>`` head); each
    piece after the first, cut again before its first ``<##`` and stripped, is one passage. The text
    after a passage's body up to the next head, ``"\\nDoc k+1"``, stays on it.
    """
    steps = []
    for match in _SEARCH_AND_INFORMATION.finditer(response_text):
        pieces = match.group(1).strip().split("##>")[1:]
        steps.append([piece.split("<##")[0].strip() for piece in pieces])
    return steps


def _count_rows(texts: Sequence[str], vocab: dict[str, int]) -> tuple[list[int], list[int], list[float]]:
    indptr, indices, counts = [0], [], []
    for text in texts:
        for token, count in Counter(_TOKEN.findall(text.lower())).items():
            indices.append(vocab.setdefault(token, len(vocab)))
            counts.append(float(count))
        indptr.append(len(indices))
    return indptr, indices, counts


def tfidf_similarity(docs: Sequence[str], golds: Sequence[str], normalize: bool = True) -> np.ndarray:
    """[len(docs), len(golds)] TF-IDF cosines with IDF fitted on {d} ∪ G per doc (see module doc), ≥ 0."""
    num_docs, num_golds = len(docs), len(golds)
    if num_docs == 0 or num_golds == 0:
        return np.zeros((num_docs, num_golds))
    if normalize:
        docs = [normalize_answer(t) for t in docs]
        golds = [normalize_answer(t) for t in golds]
    vocab: dict[str, int] = {}
    doc_rows = _count_rows(docs, vocab)
    gold_rows = _count_rows(golds, vocab)
    if not vocab:
        return np.zeros((num_docs, num_golds))
    shape_v = len(vocab)
    doc_counts = sp.csr_matrix((doc_rows[2], doc_rows[1], doc_rows[0]), shape=(num_docs, shape_v))
    gold_counts = sp.csr_matrix((gold_rows[2], gold_rows[1], gold_rows[0]), shape=(num_golds, shape_v))

    num_fit_docs = num_golds + 1  # {d} ∪ G
    df_gold = np.bincount(gold_counts.indices, minlength=shape_v).astype(np.float64)
    idf_absent = np.log((1.0 + num_fit_docs) / (1.0 + df_gold)) + 1.0  # v ∉ d
    idf_present = np.log((1.0 + num_fit_docs) / (2.0 + df_gold)) + 1.0  # v ∈ d
    sq_absent, sq_present = idf_absent**2, idf_present**2

    numerator = (doc_counts @ sp.diags(sq_present) @ gold_counts.T).toarray()
    doc_norm_sq = doc_counts.multiply(doc_counts) @ sq_present
    gold_sq = gold_counts.multiply(gold_counts).tocsr()
    doc_presence = doc_counts.copy()
    doc_presence.data[:] = 1.0
    gold_norm_sq = (gold_sq @ sq_absent)[None, :] + (
        doc_presence @ (gold_sq @ sp.diags(sq_present - sq_absent)).T
    ).toarray()
    denominator = np.sqrt(np.asarray(doc_norm_sq)[:, None] * gold_norm_sq)
    safe = denominator > 0
    sim = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=safe)
    return np.maximum(sim, 0.0)


class EmbeddingTable:
    """Unit-normalised embeddings of a set of texts, computed with one ``embed`` call."""

    def __init__(self, texts: Sequence[str], embed: EmbedFn) -> None:
        unique = list(dict.fromkeys(texts))
        self.row = {text: i for i, text in enumerate(unique)}
        vectors = np.asarray(embed(unique), dtype=np.float64) if unique else np.zeros((0, 1))
        if vectors.ndim != 2 or vectors.shape[0] != len(unique):
            raise ValueError(f"embed() must return an array of shape [{len(unique)}, dim], got {vectors.shape}")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)

    def similarity(self, docs: Sequence[str], golds: Sequence[str]) -> np.ndarray:
        """[len(docs), len(golds)] cosines, clipped at 0 (texts must be in the table)."""
        if not docs or not golds:
            return np.zeros((len(docs), len(golds)))
        left = self.vectors[[self.row[t] for t in docs]]
        right = self.vectors[[self.row[t] for t in golds]]
        return np.maximum(left @ right.T, 0.0)


def dense_similarity(docs: Sequence[str], golds: Sequence[str], embed: EmbedFn) -> np.ndarray:
    """[len(docs), len(golds)] embedding cosines clipped at 0."""
    return EmbeddingTable(list(docs) + list(golds), embed).similarity(docs, golds)


def information_gains(similarity: np.ndarray, step_of_doc: Sequence[int], num_steps: int) -> np.ndarray:
    """IG_t for t < num_steps from the [P, n] doc–gold similarities and the step of each doc (§2e)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    num_golds = similarity.shape[1] if similarity.ndim == 2 else 0
    if num_steps == 0 or num_golds == 0:
        return np.zeros(num_steps)
    coverage = np.zeros((num_steps, num_golds))  # c_t; similarities are ≥ 0 so 0 is the max's identity
    if len(step_of_doc):
        np.maximum.at(coverage, np.asarray(step_of_doc, dtype=np.int64), similarity)
    memory = np.maximum.accumulate(coverage, axis=0)  # M_t
    previous = np.vstack([np.zeros((1, num_golds)), memory[:-1]])  # M_{t-1}
    return np.maximum(coverage - previous, 0.0).mean(axis=1)


def passage_key(passage_id: str | None, text: str) -> tuple[str, str]:
    """Identity of a retrieved passage: its id when it has one, else its text."""
    return ("id", passage_id) if passage_id else ("text", text)


def redundancy_penalties(steps: Sequence["SearchStep"]) -> list[float]:
    """RP_t: fraction of step t's passages already retrieved earlier in the trajectory (§2f)."""
    keys_per_step = []
    for step in steps:
        count = max(len(step.passage_ids), len(step.passage_texts))
        ids = list(step.passage_ids) + [""] * (count - len(step.passage_ids))
        texts = list(step.passage_texts) + [""] * (count - len(step.passage_texts))
        keys_per_step.append([passage_key(pid, text) for pid, text in zip(ids, texts)])
    return repeat_fractions(keys_per_step)


def repeat_fractions(keys_per_step: Sequence[Sequence[object]]) -> list[float]:
    """Per step, the fraction of its passage keys seen earlier (earlier steps or earlier ranks)."""
    seen: set = set()
    penalties = []
    for keys in keys_per_step:
        repeats = 0
        for key in keys:
            if key in seen:
                repeats += 1
            seen.add(key)
        penalties.append(repeats / len(keys) if keys else 0.0)
    return penalties
