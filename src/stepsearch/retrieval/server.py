"""Retrieval service: FastAPI app with a Search-R1/StepSearch-compatible ``POST /retrieve``.

Request ``{"queries": [...], "topk": k, "return_scores": bool}``; answer ``{"result": [[{"document":
{"id", "contents"}, "score": s}, ...], ...]}``, one list per query in order, or the documents alone
when ``return_scores`` is false (as in Search-R1's ``retrieval_server.py``). ``GET /health`` reports
the backend and its size. Unlike the released server we validate input: an empty batch or query,
too many queries, an overlong query or a bad ``topk`` get a 4xx answer whose ``detail`` is one
line; retriever failures get 503 with the reason, never a stack trace. Binds 127.0.0.1 unless told.
"""

# No `from __future__ import annotations`: FastAPI must see the request model class itself,
# which is local to create_app (pydantic/fastapi load lazily).
import socket
import threading
import time
from dataclasses import dataclass

from stepsearch.errors import StepSearchError
from stepsearch.retrieval.base import Retriever

DEFAULT_HOST = "127.0.0.1"


def create_app(
    retriever: Retriever,
    max_batch: int = 512,
    max_query_chars: int = 4096,
    max_topk: int = 100,
    default_topk: int = 3,
):
    """Build the FastAPI app serving ``retriever`` (limits are per request)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field

    class RetrieveRequest(BaseModel):
        queries: list[str] = Field(..., description="search queries, one result list each")
        topk: int | None = Field(None, description=f"passages per query (default {default_topk})")
        return_scores: bool = False

    app = FastAPI(title="stepsearch retrieval", description=__doc__)
    app.state.retriever = retriever
    app.state.requests = 0

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse(status_code=422, content={"detail": "; ".join(problems)[:500]})

    def reject(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse(status_code=status, content={"detail": message})

    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest):
        queries, k = request.queries, request.topk if request.topk is not None else default_topk
        if not queries:
            return reject("queries is empty: send at least one query")
        if len(queries) > max_batch:
            return reject(f"too many queries: {len(queries)} > {max_batch} per request; split the batch", 413)
        if not 1 <= k <= max_topk:
            return reject(f"topk must be between 1 and {max_topk}, got {k}")
        for position, query in enumerate(queries):
            if not query.strip():
                return reject(f"query at position {position} is empty")
            if len(query) > max_query_chars:
                return reject(f"query at position {position} has {len(query)} characters (limit {max_query_chars})")
        try:
            results = app.state.retriever.search(queries, k)
        except StepSearchError as err:
            return reject(str(err), 503)
        except Exception as err:  # noqa: BLE001 - a backend failure must not leak a trace
            return reject(f"retriever failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}", 503)
        app.state.requests += 1
        if request.return_scores:
            payload = [
                [{"document": {"id": p.id, "contents": p.contents}, "score": p.score} for p in hits] for hits in results
            ]
        else:
            payload = [[{"id": p.id, "contents": p.contents} for p in hits] for hits in results]
        return {"result": payload}

    @app.get("/health")
    def health():
        backend = app.state.retriever
        return {
            "status": "ok",
            "retriever": type(backend).__name__,
            "num_docs": getattr(backend, "num_docs", getattr(getattr(backend, "inner", None), "num_docs", None)),
            "requests": app.state.requests,
            "limits": {"max_batch": max_batch, "max_query_chars": max_query_chars, "max_topk": max_topk},
        }

    return app


@dataclass
class ServerHandle:
    """A uvicorn server running in a background thread; ``stop()`` shuts it down and waits."""

    server: object
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(app, host: str = DEFAULT_HOST, port: int = 0, timeout_s: float = 20.0) -> ServerHandle:
    """Start ``app`` with uvicorn in a daemon thread; ``port=0`` picks a free port. Returns when ready."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="stepsearch-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise StepSearchError(f"retrieval service did not start on {host}:{bound_port}")
        time.sleep(0.02)
    return ServerHandle(server=server, thread=thread, host=host, port=bound_port)


def run_server(app, host: str = DEFAULT_HOST, port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
