"""Format gate and answer extraction (METHOD.md §2a, §6), over the text the model itself wrote.

The response text of a trajectory is everything after the prompt, policy and environment tokens
together (``TrajectoryRecord.response_text``). The environment inserts blocks (``<information>…``,
``<warning>…``) whose content the model did not write: a retrieved passage, or an invalid-action
notice that quotes the tags ("put the answer between <answer> and </answer>"), may contain an
``<answer>…</answer>`` pair. Such a pair is not the model's answer, so both the gate and the
extraction first remove every *closed* environment block. An unclosed ``<information>`` cannot come
from the environment (it always closes its blocks), so it is the model's own text and stays.

Gate (§2a): valid iff the model text contains ``<answer>…</answer>`` and nothing but whitespace
follows the last one. Decoder end-of-sequence strings (``RewardConfig.trailing_ignore``) after it are
not model text and are ignored; the released code had no such allowance (it decoded the trajectory
with special tokens and a trailing ``<|im_end|>`` would fail its check). Prediction (§6): the stripped
content of the last ``<answer>`` block.

An answer block holds no protocol tag: in ``<answer> … </think> <search> q </search> <answer> Paris
</answer>`` (an ``<answer>`` opened, abandoned for a search, and a real answer later) the block is
``<answer> Paris </answer>``, not everything from the first ``<answer>`` on. The gate, the
prediction, the rollout engine's ``TrajectoryRecord.answer`` and every evaluation read answers with
this one definition (``extract_answer``), so they cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from stepsearch.rewards.config import DEFAULT_TRAILING_IGNORE

# Tags of the search protocol (both templates); none of them may appear inside an answer block.
PROTOCOL_TAG_NAMES: tuple[str, ...] = ("think", "plan", "search", "answer", "information", "observation", "warning")
_ANSWER = re.compile(
    r"<answer>((?:(?!</?(?:%s)>).)*?)</answer>" % "|".join(PROTOCOL_TAG_NAMES), re.DOTALL
)
DEFAULT_ENVIRONMENT_TAGS: tuple[str, ...] = ("information", "warning")


@lru_cache(maxsize=16)
def _block_pattern(tags: tuple[str, ...]) -> re.Pattern[str]:
    names = "|".join(re.escape(t) for t in tags)
    return re.compile(rf"<({names})>.*?</\1>", re.DOTALL)


def strip_environment_blocks(text: str, tags: Sequence[str] = DEFAULT_ENVIRONMENT_TAGS) -> str:
    """The text with every closed ``<tag>…</tag>`` block of the given environment tags removed."""
    if not tags:
        return text
    return _block_pattern(tuple(tags)).sub(" ", text)


def extract_answer(response_text: str, tags: Sequence[str] = DEFAULT_ENVIRONMENT_TAGS) -> str | None:
    """Content (stripped) of the model's last ``<answer>…</answer>`` block, None if it wrote none."""
    matches = _ANSWER.findall(strip_environment_blocks(response_text, tags))
    return matches[-1].strip() if matches else None


def is_valid_format(
    response_text: str,
    tags: Sequence[str] = DEFAULT_ENVIRONMENT_TAGS,
    trailing_ignore: Sequence[str] = DEFAULT_TRAILING_IGNORE,
) -> bool:
    """§2a: an ``<answer>…</answer>`` in the model's text with only whitespace (or EOS text) after the last."""
    text = strip_environment_blocks(response_text, tags)
    last = None
    for last in _ANSWER.finditer(text):
        pass
    if last is None:
        return False
    trailing = text[last.end() :]
    for eos in trailing_ignore:
        if eos:
            trailing = trailing.replace(eos, "")
    return trailing.strip() == ""
