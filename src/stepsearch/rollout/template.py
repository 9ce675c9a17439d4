"""Prompt templates, action parsing and observation formatting (METHOD.md §1).

Two named templates:

- ``think`` (default): the Search-R1 prompt the paper's figures use — reasoning inside
  ``<think>…</think>``, queries inside ``<search>…</search>``, results inside
  ``<information>…</information>``, the final answer inside ``<answer>…</answer>``.
- ``plan``: the released StepSearch training prompt (``scripts/data_process/musi_search.py``):
  ``<plan>…</plan>`` instead of ``<think>``, and the model writes its own ``<observation>…</observation>``
  about the returned documents. Departure from a literal reading of "``<observation>`` instead of
  ``<information>``": the released prompt still returns results inside ``<information>``, so
  :func:`format_observation` uses ``<information>`` for both templates.

Observations come in the two released formats (``observation_format``, the rollout option of the
same name), so a checkpoint of either project reads the layout it was trained with. Each document is
written as the released clients write it from the service's ``contents`` (``"Title"\ntext``): the
title is its first line, quotes included, the text the rest; the documents are joined by newlines.

- ``stepsearch`` (default; StepSearch @43215ba ``generation.py``):
  ``\n\n<information> Doc 1<## Title: "T1" ##> text1\nDoc 2<## Title: "T2" ##> text2 </information>\n\n``
- ``search-r1`` (Search-R1 @a14dc3a ``generation.py``):
  ``\n\n<information>Doc 1(Title: "T1") text1\nDoc 2(Title: "T2") text2</information>\n\n``

Parsing follows Search-R1: the first ``<search>…</search>`` or ``<answer>…</answer>`` pair of the
turn's text is the action; the environment's notices go inside ``<warning>…</warning>``.
Everything here is pure text; token-level work happens in :mod:`stepsearch.rollout.engine`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from stepsearch.retrieval.base import Passage
from stepsearch.errors import StepSearchError

TAGS = (
    "<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>",
    "<information>", "</information>", "<plan>", "</plan>", "<observation>", "</observation>",
    "<warning>", "</warning>",
)  # fmt: skip
# Generation stops at the first of these (each turn ends with one action).
STOP_TAGS = ("</search>", "</answer>")

THINK_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every "
    "time you get new information. After reasoning, if you find you lack some knowledge, you can call "
    "a search engine by <search> query </search> and it will return the top searched results between "
    "<information> and </information>. You can search as many times as your want. If you find no "
    "further external knowledge needed, you can directly provide the answer inside <answer> and "
    "</answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: {question}\n"
)

PLAN_PROMPT = (
    "## Background\nYou are a deep AI research assistant with search tool\n You should first think "
    "about your research plan or what to search for next. \n\n## Response format\n"
    "1. You must make search plan inside <plan> and </plan> for in the beginning and after observation.\n"
    "2. After plan, if you find you lack some knowledge, you can call a search engine by <search> search "
    "keyword </search> and it will return the search results between <information> and </information>.\n"
    "3. You must conduct observation inside <observation> and </observation> for EVERY searched document, "
    "e.g.<observation>Based on retrieved inforamtion, Doc1 ....; Doc2...; Doc3 ...;</observation>\n"
    "4. If you find no further external knowledge needed, you can directly provide the answer inside "
    "<answer> and </answer> without detailed illustrations. For example, <answer> Beijing </answer>\n\n"
    "Please follow the loop of plan, search, information, observation, plan ... until the you can answer "
    "original question.\n Question: {question}\n"
)


# The same protocol in one line, for tiny models trained from scratch (the offline quickstart): a
# 300-token instruction they cannot read only costs attention compute on every token.
COMPACT_PROMPT = (
    "Reason in <think> </think>, search with <search> query </search>, read <information>, "
    "answer with <answer> answer </answer>. Question: {question}\n"
)


@dataclass(frozen=True)
class Template:
    """A named prompt template: the instruction text and the tag that wraps retrieved documents."""

    name: str
    prompt: str  # with a ``{question}`` field
    reasoning_tag: str  # "think" or "plan"
    information_tag: str = "information"


TEMPLATES: dict[str, Template] = {
    "think": Template("think", THINK_PROMPT, "think"),
    "plan": Template("plan", PLAN_PROMPT, "plan"),
    "compact": Template("compact", COMPACT_PROMPT, "think"),
}

# Search-R1's notice, reworded without tag pairs: a "<answer> and </answer>" inside an environment
# notice would be read as an answer by anything that scans the response text.
INVALID_ACTION_WARNING = (
    "My previous action is invalid. If I want to search, I should put the query between the search "
    "tags. If I want to give the final answer, I should put the answer between the answer tags. "
    "Let me try again."
)
LAST_TURN_WARNING = (
    "This is the last turn: no more searches are allowed. I should give the final answer between the "
    "answer tags now."
)

# name -> (one document's line from its number, title and text; text after the opening tag;
# text before the closing tag). Titles are quoted as the released clients take them from ``contents``.
OBSERVATION_FORMATS: dict[str, tuple[str, str, str]] = {
    "stepsearch": ('Doc {number}<## Title: "{title}" ##> {text}', " ", " "),
    "search-r1": ('Doc {number}(Title: "{title}") {text}', "", ""),
}
DEFAULT_OBSERVATION_FORMAT = "stepsearch"

_ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class Action:
    """The first action of a turn: ``kind`` is "search", "answer" or None; ``end`` is the character
    index just past its closing tag (-1 without an action); ``invalid`` names what was wrong when the
    turn has no usable action ("no_action", "unclosed_tag", "empty_query"), else None."""

    kind: str | None
    content: str
    end: int
    invalid: str | None = None


def get_template(template: str) -> Template:
    try:
        return TEMPLATES[template]
    except KeyError:
        raise StepSearchError(f"unknown template {template!r}: choose one of {sorted(TEMPLATES)}") from None


def check_observation_format(observation_format: str) -> str:
    if observation_format not in OBSERVATION_FORMATS:
        raise StepSearchError(f"unknown observation_format {observation_format!r}: choose one of "
                              f"{sorted(OBSERVATION_FORMATS)}")
    return observation_format


def normalize_question(question: str) -> str:
    """Strip the question and append ``?`` if it does not end with one (as the released code does)."""
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return question


def uses_chat_template(tokenizer, use_chat_template: bool | None = None) -> bool:
    """Whether :func:`format_prompt` wraps the prompt in ``tokenizer``'s chat template."""
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is True and not has_template:
        raise StepSearchError("use_chat_template=True but the tokenizer has no chat template")
    return has_template and use_chat_template is not False


def format_prompt(
    question: str, tokenizer=None, template: str = "think", use_chat_template: bool | None = None
) -> str:
    """The prompt text for one question: one user turn wrapped in the tokenizer's chat template when it
    has one (and ``use_chat_template`` is not False), the raw instruction text otherwise."""
    text = get_template(template).prompt.format(question=normalize_question(question))
    if uses_chat_template(tokenizer, use_chat_template):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def parse_action(text: str, template: str = "think") -> Action:
    """Parse the first ``<search>…</search>`` or ``<answer>…</answer>`` pair of a turn's text.

    Both templates share the action tags, so ``template`` only validates the name. An empty search
    query is reported as ``invalid="empty_query"`` (kind stays "search" so callers can log it).
    """
    get_template(template)
    match = _ACTION_RE.search(text)
    if match is None:
        unclosed = "<search>" in text or "<answer>" in text
        return Action(None, "", -1, "unclosed_tag" if unclosed else "no_action")
    kind, content = match.group(1), match.group(2).strip()
    invalid = "empty_query" if kind == "search" and not content else None
    return Action(kind, content, match.end(), invalid)


def extract_answer(text: str) -> str | None:
    """The model's answer: :func:`stepsearch.rewards.format.extract_answer`, the one definition the
    format gate and every evaluation share (last tag-free ``<answer>`` block, stripped; None without)."""
    from stepsearch.rewards.format import extract_answer as answer_of  # lazy: loads torch, transformers, matplotlib

    return answer_of(text)


def format_documents(passages: Sequence[Passage], observation_format: str = DEFAULT_OBSERVATION_FORMAT) -> str:
    """One line per passage in ``observation_format`` (module docstring); stripped at both ends, as
    the released clients strip the joined block."""
    line = OBSERVATION_FORMATS[check_observation_format(observation_format)][0]
    return "\n".join(line.format(number=i, title=p.title, text=p.text) for i, p in enumerate(passages, 1)).strip()


def format_observation(passages: Sequence[Passage], template: str = "think",
                       observation_format: str = DEFAULT_OBSERVATION_FORMAT) -> str:
    """The whole environment block: head, :func:`format_documents`, tail (module docstring)."""
    head, tail = observation_parts(template, observation_format)
    return head + format_documents(passages, observation_format) + tail


def observation_parts(template: str = "think", observation_format: str = DEFAULT_OBSERVATION_FORMAT) -> tuple[str, str]:
    """The fixed head and tail around the documents, so a truncated observation keeps its closing tag."""
    tag = get_template(template).information_tag
    _line, after_open, before_close = OBSERVATION_FORMATS[check_observation_format(observation_format)]
    return f"\n\n<{tag}>{after_open}", f"{before_close}</{tag}>\n\n"


def format_warning(message: str) -> str:
    """An environment notice: ``\\n\\n<warning> {message} </warning>\\n\\n``."""
    return f"\n\n<warning> {message} </warning>\n\n"
