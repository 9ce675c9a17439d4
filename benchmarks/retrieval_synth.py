"""Deterministic Wikipedia-like passages and MiniLM-like vectors at any size (for ``retrieval_scale.py``).

How the text is made (statistics of the shared corpus, 7,416 Wikipedia paragraphs):

* passage length: drawn from the shared passages' word counts (mean 82, median 70 words);
* words: each token is, with probability 1 - 0.086, a word of the shared corpus drawn by its
  frequency (83,715 types, as whitespace tokens: names, numbers, punctuation attached), and with
  probability 0.086 (the share of tokens that are hapax legomena there, i.e. the rate at which new
  words appear) a word of an unbounded synthetic lexicon drawn from a Zipf(1.3) law over its
  ranks, so the vocabulary keeps growing with the corpus as real text does (Heaps' law) instead of
  stopping at 84k types;
* titles: 1-3 words drawn from the shared corpus's title words;
* the real passages are mixed in at evenly spaced rows (``real_positions``).

How the vectors are made: the real MiniLM vectors are k-means clustered (64 clusters); synthetic
vectors are drawn per cluster (chosen by its size) as centre + Gaussian noise with the cluster's
per-dimension spread, renormalised; the real vectors take the rows of the real passages.

Chunk ``i`` of generated passages depends only on (seed, i): a 100k corpus is the start of the 1M one
(apart from where the real passages sit).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NEW_WORD_SHARE = 0.086
TAIL_ZIPF = 1.3
CHUNK = 20_000
CLUSTERS = 64


class CorpusModel:
    """Word, length and title statistics of the shared corpus (see the module docstring)."""

    def __init__(self, passages) -> None:
        from collections import Counter

        words, titles = Counter(), Counter()
        self.lengths = np.asarray([len(p.text.split()) for p in passages])
        for p in passages:
            words.update(p.text.split())
            titles.update(p.title.split())
        self.words = np.asarray(list(words), dtype=object)
        self.word_cdf = np.cumsum(np.fromiter(words.values(), float)) / sum(words.values())
        self.title_words = np.asarray(list(titles), dtype=object)
        self.title_cdf = np.cumsum(np.fromiter(titles.values(), float)) / sum(titles.values())

    def chunk(self, seed: int, chunk_no: int, count: int) -> list[tuple[str, str]]:
        """``count`` (title, text) pairs; chunk ``chunk_no`` is the same whatever else is generated."""
        rng = np.random.default_rng([seed, chunk_no])
        lengths = rng.choice(self.lengths, size=count)
        total = int(lengths.sum())
        tokens = self.words[np.minimum(np.searchsorted(self.word_cdf, rng.random(total)), len(self.words) - 1)]
        new = rng.random(total) < NEW_WORD_SHARE
        tokens[new] = [_tail_word(r) for r in rng.zipf(TAIL_ZIPF, size=int(new.sum()))]
        title_sizes = rng.integers(1, 4, size=count)
        title_tokens = self.title_words[np.minimum(np.searchsorted(self.title_cdf, rng.random(int(title_sizes.sum()))),
                                                   len(self.title_words) - 1)]
        out, start, title_start = [], 0, 0
        for length, title_size in zip(lengths, title_sizes):
            out.append((" ".join(title_tokens[title_start : title_start + title_size]),
                        " ".join(tokens[start : start + length])))
            start += length
            title_start += title_size
        return out


_SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]  # 80 syllables


def _tail_word(rank: int) -> str:
    """The synthetic word of a Zipf rank: its base-80 digits as syllables, then "q" ("beq", "bibeq", ...)."""
    parts = []
    rank = int(rank)
    while True:
        rank, digit = divmod(rank, len(_SYLLABLES))
        parts.append(_SYLLABLES[digit])
        if rank == 0:
            return "".join(parts) + "q"  # no English word ends in "q": never a real word


def real_positions(size: int, real_count: int) -> np.ndarray:
    """Where the real passages go in a corpus of ``size``: evenly spaced rows."""
    return (np.arange(real_count) * (size / real_count)).astype(np.int64)


def write_generated_corpus(path: Path, size: int, model: CorpusModel, real, seed: int) -> None:
    """``size`` rows in wiki-18 layout: generated passages with the real ones at ``real_positions``."""
    positions = set(real_positions(size, len(real)).tolist())
    real_iter, generated, chunk_no = iter(real), [], 0
    with path.open("w", encoding="utf-8") as handle:
        for row in range(size):
            if row in positions:
                passage = next(real_iter)
                record = {"id": passage.id, "contents": passage.contents}
            else:
                if not generated:
                    generated = model.chunk(seed, chunk_no, CHUNK)[::-1]
                    chunk_no += 1
                title, text = generated.pop()
                record = {"id": f"gen-{row}", "contents": f'"{title}"\n{text}'}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def clustered_vectors(real: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` unit vectors: synthetic ones per k-means cluster of ``real``, the real ones mixed in."""
    import faiss

    kmeans = faiss.Kmeans(real.shape[1], CLUSTERS, niter=20, seed=seed, verbose=False)
    kmeans.train(real)
    assign = kmeans.index.search(real, 1)[1][:, 0]
    spread = np.stack([real[assign == c].std(axis=0) if (assign == c).sum() > 1 else real.std(axis=0)
                       for c in range(CLUSTERS)])
    weights = np.bincount(assign, minlength=CLUSTERS) / len(real)
    rng = np.random.default_rng(seed)
    out = np.empty((size, real.shape[1]), dtype=np.float32)
    for start in range(0, size, 100_000):
        n = min(100_000, size - start)
        clusters = rng.choice(CLUSTERS, size=n, p=weights)
        block = kmeans.centroids[clusters] + spread[clusters] * rng.standard_normal((n, real.shape[1])).astype(np.float32)
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out[real_positions(size, len(real))] = real
    return out
