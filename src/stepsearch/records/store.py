"""Checks before work starts: the MLflow tracking store and every output path, in one line each.

- :func:`check_store`: the store is asked once, with a short timeout (``STORE_TIMEOUT`` seconds) and
  no retries: an HTTP server must answer (``http://127.0.0.1:9``: "unreachable (connection
  refused)"), a sqlite file must be a database this process can write (or, for a new one, its folder
  must take a file), a file store's folder must be writable. ``fit``, ``validate``/``test``/``predict``,
  ``evaluate``, ``compare`` and ``ui`` call it before anything else (``write=False`` only reads).
- :func:`bound_http_retries`: MLflow's own HTTP settings default to 7 retries with exponential
  backoff and a 120 s timeout per request, minutes per call against a dead server. Unless the
  environment sets them, this process uses ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``,
  ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=30`` (MLflow reads them
  at every request; child processes such as DDP ranks inherit them): a store that dies mid-run costs
  seconds per call, not minutes. An explicit setting (say, for a rate-limited server) wins.
- :func:`check_writable`: an output folder or file can be created and written, tested by creating
  and deleting a file in its nearest existing folder, so nothing is left behind and it works for
  root too (where permission bits do not stop writes, but a read-only filesystem or a path
  through a regular file does).
- :func:`read_text`: a config or suite file as text; a binary file is one line.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from stepsearch.errors import StepSearchError

STORE_TIMEOUT = 5  # seconds for the one check of the store
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# What a failed HTTP check says, from the (long, nested) exception text.
_HTTP_REASONS = (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                 ("nodename nor servname", "unknown host"), ("timed out", "no answer"), ("Read timed out", "no answer"),
                 ("SSLError", "TLS error"), ("Network is unreachable", "network unreachable"),
                 ("No route to host", "no route to host"))


def bound_http_retries() -> None:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for in-memory or other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def file_store_path(uri: str) -> Path | None:
    """The folder of a file store (``file:///x``, ``file:x``, or a plain path), else ``None``."""
    if uri.startswith("file:"):
        return Path(re.sub(r"^file:(//)?", "", uri))
    return None if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else Path(uri)


def check_store(uri: str, write: bool = True, timeout: float = STORE_TIMEOUT, initialise: bool = False) -> None:
    """One line naming ``uri`` and what failed, if the store cannot be used. ``initialise`` (``fit``,
    about to log into it): also create a sqlite store's tables, under a lock (:func:`_initialise_sqlite`)."""
    bound_http_retries()
    if uri.startswith(("http://", "https://")):
        _check_http(uri, timeout)
        return
    database = sqlite_path(uri)
    if database is not None:
        _check_sqlite(uri, database, write, timeout, initialise)
        return
    folder = file_store_path(uri)
    if folder is not None and write:
        problem = writable_problem(folder)
        if problem:
            raise StepSearchError(f"tracking store {uri}: cannot write {folder} ({problem}); set MLFLOW_TRACKING_URI "
                                  "or trainer.logger.init_args.tracking_uri to a writable store")


def _check_http(uri: str, timeout: float) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout)))})
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as err:
        text = str(err)
        reason = next((said for found, said in _HTTP_REASONS if found in text), None)
        if reason is None:
            status = re.search(r"status code (\d+)|HTTP (\d{3})|(\d{3}) Client Error|(\d{3}) Server Error", text)
            reason = f"HTTP {next(g for g in status.groups() if g)}" if status else text.splitlines()[0][:200]
        raise StepSearchError(f"tracking store {uri}: unreachable ({reason}; checked with a {timeout:g} s timeout, "
                              "no retries); start the server, or set MLFLOW_TRACKING_URI / --tracking-uri / "
                              "trainer.logger.init_args.tracking_uri to a reachable store") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_sqlite(uri: str, database: Path, write: bool, timeout: float, initialise: bool = False) -> None:
    import sqlite3

    def fail(what: str):
        return StepSearchError(f"tracking store {uri}: {what}; set MLFLOW_TRACKING_URI or "
                               "trainer.logger.init_args.tracking_uri (evaluate/compare/ui: --tracking-uri) to a usable store")

    if not database.exists():
        if not write:
            return  # reading a store that is not there yet: the command says so itself
        problem = writable_problem(database.parent, create=False)
        if problem:
            raise fail(f"cannot create {database} ({problem})")
        if initialise:
            _initialise_sqlite(uri, database)
        return
    if database.is_dir():
        raise fail(f"{database} is a folder, not a database file")
    try:
        connection = sqlite3.connect(f"file:{database}?mode={'rw' if write else 'ro'}", uri=True, timeout=timeout)
        try:
            connection.execute("PRAGMA schema_version").fetchone()
            if write:
                connection.execute("BEGIN IMMEDIATE")  # takes the write lock: a read-only file or disk fails here
                connection.rollback()
        finally:
            connection.close()
    except sqlite3.Error as err:
        reason = str(err)
        if "locked" in reason and write:
            return  # a live database another process is writing to (a concurrent fit): writable
        if "readonly" in reason or "read-only" in reason or "unable to open" in reason:
            reason = f"cannot write {database} ({reason})" if write else f"cannot open {database} ({reason})"
        elif "not a database" in reason:
            reason = f"{database} is not an MLflow store ({reason})"
        elif "locked" in reason:
            reason = f"{database} stayed locked by another process for {timeout:g} s"
        raise fail(reason) from None
    if write:
        problem = writable_problem(database.parent, create=False)  # sqlite writes its journal beside the file
        if problem:
            raise fail(f"cannot write beside {database} ({problem})")
        if initialise:
            _initialise_sqlite(uri, database)


def _initialise_sqlite(uri: str, database: Path) -> None:
    """Create (or bring up to date) MLflow's tables while holding an exclusive lock on the store's
    folder. Several fits started at once on a new ``mlflow.db`` (seeds side by side) otherwise race
    MLflow's schema migration, and all but one die in jsonargparse with "Online migration expected to
    match one row". Idempotent: on a ready store it only checks the schema version."""
    import fcntl

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = os.open(database.parent, os.O_RDONLY)  # a lock on the folder: no lock file left behind
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        SqlAlchemyStore(uri, str(database.parent / "mlartifacts"))  # creates/migrates the tables, nothing else
    finally:
        os.close(folder)  # closing releases the lock


def writable_problem(path, create: bool = True) -> str | None:
    """Why a file cannot be created in folder ``path`` (made if ``create``), or ``None``. Tests by
    creating and deleting a file in ``path``, or in its nearest existing folder when it is not there yet."""
    path = Path(path)
    probe_in = path
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        return f"{probe_in} is a file, not a folder"
    if probe_in != path and not create:
        return f"{path} does not exist"
    try:
        handle, name = tempfile.mkstemp(prefix=".stepsearch-write-check-", dir=probe_in)
        os.close(handle)
        os.unlink(name)
    except OSError as err:
        return f"{err.strerror or err}" + ("" if probe_in == path else f" in {probe_in}")
    return None


def check_writable(path, what: str, kind: str = "folder") -> None:
    """One line if ``path`` (``kind`` folder or file) cannot be written; nothing is created."""
    path = Path(path)
    if kind == "file":
        if path.is_dir():
            raise StepSearchError(f"{what} {path}: is a folder, not a file")
        folder = path.parent
    else:
        if path.exists() and not path.is_dir():
            raise StepSearchError(f"{what} {path}: is a file, not a folder")
        folder = path
    problem = writable_problem(folder)
    if problem:
        raise StepSearchError(f"{what} {path}: cannot write there ({problem})")


def read_text(path, what: str) -> str:
    """The text of a config/suite file; one line for an unreadable or binary file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise StepSearchError(f"{what} {path}: not a text file (byte {err.start} is not UTF-8); "
                              "expected YAML") from None
    except OSError as err:
        raise StepSearchError(f"{what} {path}: cannot read it ({err.strerror or err})") from None


def logger_store_uris(config) -> list[str]:
    """The tracking URIs of the MLflow loggers a Lightning config names (``trainer.logger``), as the
    loggers will resolve them: ours defaults to ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``,
    Lightning's to ``$MLFLOW_TRACKING_URI`` or ``file:{save_dir}``."""
    from stepsearch.records.tracking import default_tracking_uri  # lazy: loads lightning, torch, transformers

    entries = config.get("trainer.logger") if "trainer.logger" in config else None
    uris = []
    for entry in entries if isinstance(entries, list) else [entries]:
        get = getattr(entry, "get", None)
        class_path = str(get("class_path") or "") if get else ""
        if not class_path.endswith("MLFlowLogger"):
            continue
        init = get("init_args") or {}
        uri = init.get("tracking_uri")
        if not uri and class_path.startswith("stepsearch."):
            uri = default_tracking_uri()
        elif not uri:
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{init.get('save_dir') or './mlruns'}"
        uris.append(str(uri))
    return uris


def check_logger_stores(config) -> None:
    """:func:`check_store` for every MLflow logger of a Lightning config, before it is built."""
    for uri in logger_store_uris(config):
        check_store(uri, initialise=True)
