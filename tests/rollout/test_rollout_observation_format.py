"""The engine writes the observation format it is configured with (``rollout.observation_format``),
so a checkpoint of either released project reads the layout it was trained with; the masks still
cover exactly the policy's tokens."""

from __future__ import annotations

import pytest

from stepsearch.errors import StepSearchError
from stepsearch.rollout.engine import RolloutConfig
from stepsearch.rollout.hf_engine import HFRolloutEngine
from stepsearch.rollout.scripted import ScriptedPolicy

QUESTION = "What was Porcaro"
TURNS = ["<think> find him </think><search> Jeff Porcaro </search>", "<answer> drummer </answer>"]


@pytest.mark.parametrize("observation_format", ["stepsearch", "search-r1"])
def test_engine_writes_the_configured_format(tiny, retriever, observation_format):
    _, tokenizer = tiny
    config = RolloutConfig(max_turns=2, max_response_tokens=40, max_observation_tokens=4000,
                           max_context_tokens=8000, observation_format=observation_format)
    engine = HFRolloutEngine(ScriptedPolicy(tokenizer, {QUESTION: TURNS}), tokenizer, retriever, config)
    record = engine.generate([QUESTION]).records[0]
    passages = retriever.inner.search(["Jeff Porcaro"], config.top_k)[0]
    assert len(passages) >= 2
    # Written out from the released clients' layouts (rollout.template docstring), not by the code under test.
    if observation_format == "stepsearch":
        documents = "\n".join(f'Doc {i}<## Title: "{p.title}" ##> {p.text}' for i, p in enumerate(passages, 1))
        expected = f"\n\n<information> {documents} </information>\n\n"
    else:
        documents = "\n".join(f'Doc {i}(Title: "{p.title}") {p.text}' for i, p in enumerate(passages, 1))
        expected = f"\n\n<information>{documents}</information>\n\n"
    observation = record.response_text.split("</search>", 1)[1].split("<answer>", 1)[0]
    assert observation == expected and record.answer == "drummer"


def test_unknown_observation_format_is_one_line():
    with pytest.raises(StepSearchError, match=r"^unknown observation_format 'plain': choose one of "
                                              r"\['search-r1', 'stepsearch'\]$"):
        RolloutConfig(observation_format="plain")
