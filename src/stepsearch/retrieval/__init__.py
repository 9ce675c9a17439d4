"""Retrieval: the Retriever protocol and its backends (Pyserini BM25, dense FAISS, HTTP, cache).

Backends import pyserini/faiss/torch lazily: importing this package is cheap. Entry points:
``build_index``/``attach_index`` (index.py: ours, or indexes built elsewhere), ``RetrieverConfig``/
``build_retriever``/``load_retriever`` (factory.py), FAISS index types (faiss_index.py),
``read_corpus``/``write_corpus`` (corpus.py), ``create_app``/``serve_in_thread`` (server.py) over a
micro-batching ``SearchBatcher`` (batcher.py). Guide: ``docs/retrieval.md``.
"""

from stepsearch.retrieval.base import Passage, Retriever, check_search_args, split_contents

__all__ = ["Passage", "Retriever", "check_search_args", "split_contents"]
