"""Retrieval: the Retriever protocol and its backends (Pyserini BM25, dense FAISS, HTTP, cache).

Backends import pyserini/faiss/torch lazily: importing this package is cheap. Entry points:
``build_index`` (index.py), ``RetrieverConfig``/``build_retriever``/``load_retriever`` (factory.py),
``read_corpus``/``write_corpus`` (corpus.py), ``create_app``/``serve_in_thread`` (server.py).
"""

from stepsearch.retrieval.base import Passage, Retriever, check_search_args, split_contents

__all__ = ["Passage", "Retriever", "check_search_args", "split_contents"]
