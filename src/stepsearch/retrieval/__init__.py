"""Retrieval: the Retriever protocol and its backends (Pyserini BM25, dense FAISS, HTTP, cache).

Backends import pyserini/faiss lazily: importing this package is cheap.
"""

from stepsearch.retrieval.base import Passage, Retriever, split_contents

__all__ = ["Passage", "Retriever", "split_contents"]
