"""Access to Anserini's Java classes (the engine under Pyserini) with a quiet, configured JVM.

We call the same Java classes that Pyserini's ``LuceneSearcher`` and ``LuceneIndexer`` wrap
(``io.anserini.search.SimpleSearcher``, ``io.anserini.index.SimpleIndexer``) through
``pyserini.pyclass``, which puts Pyserini's bundled Anserini jar on the classpath. Importing
``pyserini.search.lucene`` instead would pull in torch, transformers and an OpenAI client (~6 s,
and it fails with openai >= 2 when no key is set); the Java calls are identical.

Thread safety: every call into the JVM goes through :data:`JVM_LOCK`. pyjnius (the Python-Java
bridge) is not safe when several Python threads call Java methods at once: under 8-16 concurrent
searchers we saw ``NullPointerException`` from Lucene and ``IncompatibleClassChangeError:
Receiver class java.util.ArrayList does not implement the interface java.util.Set`` (a method
resolved for one thread's object applied to another's). Anserini's ``batch_search`` still runs its
own Java thread pool inside one call, so the lock costs little: batch queries to go faster.

The JVM's INFO logging (log4j2) and Lucene's java.util.logging notice about new JDKs are lowered
to warnings/severe so that commands print only what matters.
"""

from __future__ import annotations

import functools
import re
import threading
from types import SimpleNamespace

from stepsearch.errors import RetrievalError
from stepsearch.java import ensure_java

# One lock for the whole process (all indexes, searchers and indexers): see the module docstring.
JVM_LOCK = threading.RLock()


@functools.cache
def lucene() -> SimpleNamespace:
    """Start the JVM once and return the Java classes we use (``SimpleSearcher``, ``SimpleIndexer``...)."""
    with JVM_LOCK:
        return _start()


def _start() -> SimpleNamespace:
    ensure_java()
    try:
        import pyserini.pyclass  # noqa: F401 - configures the classpath with Anserini's fat jar
        from jnius import autoclass
    except ImportError as err:  # pragma: no cover - pyserini is a hard dependency
        raise RetrievalError(f"Pyserini is not installed ({err}); `pip install pyserini`") from None
    _quiet_jvm_logging(autoclass)
    return SimpleNamespace(
        SimpleSearcher=autoclass("io.anserini.search.SimpleSearcher"),
        SimpleIndexer=autoclass("io.anserini.index.SimpleIndexer"),
        ArrayList=autoclass("java.util.ArrayList"),
        String=autoclass("java.lang.String"),
    )


def _quiet_jvm_logging(autoclass) -> None:
    try:
        level = autoclass("org.apache.logging.log4j.Level")
        configurator = autoclass("org.apache.logging.log4j.core.config.Configurator")
        log_manager = autoclass("org.apache.logging.log4j.LogManager")
        configurator.setAllLevels(log_manager.getRootLogger().getName(), level.WARN)
        jul_manager = autoclass("java.util.logging.LogManager")
        jul_level = autoclass("java.util.logging.Level")
        # The root logger is held strongly by the LogManager; child loggers inherit its level.
        jul_manager.getLogManager().getLogger("").setLevel(jul_level.SEVERE)
    except Exception:  # noqa: BLE001 - logging is cosmetic; never fail retrieval over it
        pass


def java_error_message(err: BaseException, limit: int = 160) -> str:
    """A Java exception as ``SimpleClassName: message``: first line only, no stack trace, short."""
    text = str(err).strip().removeprefix("JVM exception occurred: ")
    first = text.splitlines()[0] if text else type(err).__name__
    first = re.sub(r"^(?:[a-z_][\w$]*\.)+(?=[A-Z])", "", first)  # org.apache.lucene.index.X -> X
    return first if len(first) <= limit else first[: limit - 3] + "..."
