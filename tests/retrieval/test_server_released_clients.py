"""The service as a drop-in for the released clients (Search-R1 @a14dc3a, StepSearch @43215ba).

Their rollouts call the service as ``requests.post(url, json=payload).json()['result']`` with no
status check, so anything but a ``result`` list of the right length crashes training with
``KeyError: 'result'``. ``search_r1_batch_search`` below is written the same way (facts of their
``generation.py``, not their code); the service is the real app over the real BM25 index, with the
limits ``serve`` uses by default.
"""

from __future__ import annotations

import httpx
import pytest
import requests

from stepsearch.retrieval.client import HttpRetriever
from stepsearch.retrieval.server import ServiceLimits, create_app, serve_in_thread
from stepsearch.rollout.template import format_observation


def search_r1_batch_search(url: str, queries: list[str], topk: int = 3) -> list:
    """As the released rollouts do it: POST, decode, read ``['result']`` without looking at the status."""
    payload = {"queries": queries, "topk": topk, "return_scores": True}
    return requests.post(f"{url}/retrieve", json=payload).json()["result"]


def released_observation(result: list, style: str) -> str:
    """The observation block the released clients build from one query's ``result`` entry: title = first
    line of ``contents``, text = the other lines; ``stepsearch``: ``Doc k<## Title: T ##> text`` lines
    in ``<information> … </information>``; ``search-r1``: ``Doc k(Title: T) text`` without the spaces."""
    lines = ""
    for rank, item in enumerate(result, 1):
        contents = item["document"]["contents"]
        title, text = contents.split("\n")[0], "\n".join(contents.split("\n")[1:])
        lines += f"Doc {rank}<## Title: {title} ##> {text}\n" if style == "stepsearch" else f"Doc {rank}(Title: {title}) {text}\n"
    if style == "stepsearch":
        return f"\n\n<information> {lines.strip()} </information>\n\n"
    return f"\n\n<information>{lines.strip()}</information>\n\n"


@pytest.fixture(scope="module")
def service(bm25_retriever):
    handle = serve_in_thread(create_app(bm25_retriever))  # serve's defaults
    yield handle
    handle.stop()


def _ids(hit_lists):
    return [[(hit["document"]["id"], round(hit["score"], 4)) for hit in hits] for hits in hit_lists]


def test_serve_defaults_fit_every_released_recipe():
    import argparse

    from stepsearch.retrieval.commands import configure_serve

    parser = argparse.ArgumentParser()
    configure_serve(parser)
    defaults = parser.parse_args(["--index", "x"])
    assert defaults.max_batch == ServiceLimits().max_batch >= 8192  # Search-R1's train_grpo.sh: 512 x 5 = 2,560
    assert parser.parse_args(["--index", "x", "--max-batch", "100"]).max_batch == 100
    assert defaults.topk == ServiceLimits().default_topk == 3


def test_empty_and_whitespace_queries_get_empty_hit_lists(service, bm25_retriever):
    queries = ["Jeff Porcaro drummer", "", "Neil Peart Rush", "  \n ", "Mountrail County"]
    result = search_r1_batch_search(service.url, queries)
    assert len(result) == 5 and result[1] == [] and result[3] == []
    local = bm25_retriever.search([queries[0], queries[2], queries[4]], 3)
    assert _ids([result[0], result[2], result[4]]) == [[(p.id, round(p.score, 4)) for p in hits] for hits in local]
    assert search_r1_batch_search(service.url, [" "]) == [[]]
    assert search_r1_batch_search(service.url, []) == []  # a rollout step without any search action
    # Our own client sends no empty query (its check refuses it), and reads the answer the same way.
    with HttpRetriever(service.url) as client:
        assert client.search(["Neil Peart Rush"], 3) == [local[1]]


def test_a_2560_query_post_is_answered_in_micro_batches(bm25_retriever, corpus):
    titles = list(dict.fromkeys(p.title for p in corpus.passages))
    queries = [titles[i % len(titles)] + (" history" if i >= len(titles) else "") for i in range(2560)]
    queries[7] = ""  # a model that wrote <search> </search> inside the big batch
    app = create_app(bm25_retriever, request_timeout_s=120)  # 2 shared CPU cores; serve's other defaults
    with serve_in_thread(app) as service:
        result = search_r1_batch_search(service.url, queries)
        health = httpx.get(f"{service.url}/health").json()
    assert len(result) == 2560 and result[7] == []
    others = [position for position in range(2560) if position != 7]
    local = bm25_retriever.search([queries[i] for i in others], 3)
    assert _ids([result[i] for i in others]) == [[(p.id, round(p.score, 4)) for p in hits] for hits in local]
    assert sum(len(hits) == 3 for hits in result) > 2000  # mostly full hit lists (some titles match fewer passages)
    searched = len(set(queries) - {""})
    # One request, searched in chunks of max_batch_queries (1024): ceil(searched / 1024) calls.
    assert health["requests"] == 1 and health["batching"]["searched_queries"] == searched
    assert health["batching"]["search_calls"] == -(-searched // 1024) >= 3


def test_beyond_the_limit_is_413_which_the_released_client_cannot_read(bm25_retriever):
    with serve_in_thread(create_app(bm25_retriever, max_batch=16)) as small:
        response = requests.post(f"{small.url}/retrieve", json={"queries": ["Toto"] * 17, "topk": 3})
        assert response.status_code == 413
        assert response.json() == {"detail": "too many queries: 17 > 16 per request; split the batch"}
        with pytest.raises(KeyError, match="result"):
            search_r1_batch_search(small.url, ["Toto"] * 17)
        assert len(search_r1_batch_search(small.url, ["Toto"] * 16)) == 16


def test_observations_are_byte_identical_to_the_released_clients(service, musique_queries):
    """20 ordinary questions: what the released clients build from the service's answer equals
    what our engine writes from our client's passages, in both formats."""
    queries = [item.query for item in musique_queries[:20]]  # MuSiQue sub-questions
    result = search_r1_batch_search(service.url, queries)
    with HttpRetriever(service.url) as client:
        passages = client.search(queries, 3)
    assert len(queries) == 20
    for released, ours in zip(result, passages):
        assert [item["document"]["id"] for item in released] == [p.id for p in ours]
        assert [item["document"]["contents"] for item in released] == [p.contents for p in ours]
        for style in ("stepsearch", "search-r1"):
            assert format_observation(ours, observation_format=style) == released_observation(released, style)
