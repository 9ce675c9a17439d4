"""Search keys: the alternative queries ``K_j`` of each sub-question (METHOD.md §2c, §4), as pure
functions of the source annotations.

The paper asks an LLM for several search queries per sub-question and keeps those whose retrieval
hits the golden paragraph. We derive the variants without an LLM, from what the datasets annotate:

- MuSiQue: the sub-question with ``#k`` replaced by the answer of hop k; for the
  ``entity >> relation`` style, "entity relation", "relation of entity", a paraphrase of common
  Wikidata relations, and the golden paragraph's title with the relation; for natural-language
  sub-questions, a keyword form (stop words dropped) and the golden title with those keywords;
- HotpotQA (no decomposition): the supporting titles, each with the question words its supporting
  sentences contain, and the question's keyword form for the first hop of a bridge question;
- 2WikiMultiHopQA: the evidence triples (subject, relation, object) → "subject relation" etc.

Keys never contain the answer of their own hop. Duplicates under SQuAD normalisation (which the
search-key reward applies, METHOD.md §2) are dropped, first phrasing kept. Filtering by retrieval
lives in :mod:`stepsearch.data.pipeline`.
"""

from __future__ import annotations

import re
import string

# Compact English stop-word list for keyword queries: function words and question words. Kept
# here (not sklearn's) so the data layer does not import scikit-learn.
STOP_WORDS = frozenset(
    """a an the and or but nor so yet of in on at to for from by with about as into onto upon over
    under after before between during through without within against among than then
    is are was were be been being am do does did done doing has have had having will would shall
    should can could may might must ought
    what which who whom whose when where why how whatever whichever
    this that these those there here it its it's they them their theirs he him his she her hers we
    us our you your i me my mine one ones
    also just only very too more most much many some any each every all both either neither
    not no yes if whether while because since until unless
    name named called known""".split()
)

# Cheap natural phrasings of frequent Wikidata relations (MuSiQue ``>>`` hops, 2Wiki triples).
RELATION_PARAPHRASES: dict[str, str] = {
    "located in the administrative territorial entity": "located in",
    "country of citizenship": "nationality",
    "place of birth": "born in",
    "date of birth": "born",
    "place of death": "died in",
    "date of death": "died",
    "place of burial": "buried in",
    "member of sports team": "played for team",
    "performer": "performed by",
    "director": "directed by",
    "producer": "produced by",
    "composer": "composed by",
    "author": "written by",
    "publication date": "release date",
    "record label": "label",
    "headquarters location": "headquarters",
    "capital of": "capital city of",
    "inception": "founded",
    "location of formation": "formed in",
    "educated at": "studied at",
    "employer": "works for",
    "spouse": "married to",
    "sibling": "brother sister",
    "father": "father",
    "mother": "mother",
    "owned by": "owner",
    "mouth of the watercourse": "flows into",
    "continent": "continent",
    "country": "country",
}

_REF = re.compile(r"#(\d+)")
_WORD = re.compile(r"[^\W_]+(?:['’.\-][^\W_]+)*", re.UNICODE)
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PAREN = re.compile(r"\s*\([^)]*\)")


def normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, drop ASCII punctuation, drop a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def words(text: str) -> list[str]:
    """Word tokens in order, keeping inner apostrophes/hyphens/dots (``Australia's``, ``F.C``)."""
    return _WORD.findall(text)


def keyword_form(text: str) -> str:
    """The text with stop words, ``>>`` and punctuation dropped; original case and order kept."""
    return " ".join(w for w in words(text.replace(">>", " ")) if w.lower() not in STOP_WORDS)


def strip_parenthetical(title: str) -> str:
    """``"The Zone (2017 film)"`` → ``"The Zone"`` (Wikipedia disambiguation suffix)."""
    return _PAREN.sub("", title).strip() or title.strip()


def references(text: str) -> list[int]:
    """The hop numbers ``k`` referenced as ``#k`` in a sub-question, in order."""
    return [int(m) for m in _REF.findall(text)]


def resolve_references(text: str, earlier_answers: list[str]) -> str:
    """Replace each ``#k`` (1-based hop number) by the answer of hop k.

    Raises ``ValueError`` naming the reference when k is not an earlier hop or its answer is empty.
    """

    def sub(match: re.Match) -> str:
        k = int(match.group(1))
        if not 1 <= k <= len(earlier_answers):
            raise ValueError(f"#{k} does not refer to an earlier sub-question (hops before it: {len(earlier_answers)})")
        answer = earlier_answers[k - 1].strip()
        if not answer:
            raise ValueError(f"#{k} refers to a sub-question without an answer")
        return answer

    return " ".join(_REF.sub(sub, text).split())


def split_relation(text: str) -> tuple[str, str] | None:
    """MuSiQue's ``entity >> relation`` hop → (entity, relation); ``None`` for natural questions."""
    if ">>" not in text:
        return None
    entity, _, relation = text.partition(">>")
    entity, relation = entity.strip(), relation.strip()
    if not entity or not relation:
        return None
    return entity, relation


def dedup_keys(keys: list[str], forbidden: list[str] = ()) -> list[str]:
    """Drop empty keys, normalised duplicates, and keys that contain a forbidden string (the hop's
    own answer, as whole words after normalisation): a key must not give the answer away."""
    banned = [f" {normalize(f)} " for f in forbidden if f and normalize(f)]
    seen: set[str] = set()
    out: list[str] = []
    for key in keys:
        key = " ".join(key.split()).strip(" ?")
        norm = normalize(key)
        if not norm or norm in seen or any(b in f" {norm} " for b in banned):
            continue
        seen.add(norm)
        out.append(key)
    return out


def relation_keys(entity: str, relation: str, golden_titles: list[str] = ()) -> list[str]:
    """Keys of an ``entity >> relation`` hop (or a ``(subject, relation, _)`` triple)."""
    keys = [f"{entity} {relation}", f"{relation} of {entity}"]
    paraphrase = RELATION_PARAPHRASES.get(relation.lower())
    if paraphrase and paraphrase != relation.lower():
        keys.append(f"{entity} {paraphrase}")
    short = strip_parenthetical(entity)
    if short != entity:
        keys.append(f"{short} {relation}")
    for title in golden_titles:
        if normalize(title) != normalize(entity):
            keys.append(f"{title} {relation}")
    keys.append(keyword_form(f"{entity} {relation}"))
    return keys


def musique_keys(resolved: str, golden_titles: list[str] = (), answer: str = "") -> list[str]:
    """Search keys of one MuSiQue hop, given its text with ``#k`` already resolved."""
    rel = split_relation(resolved)
    if rel is not None:
        keys = relation_keys(rel[0], rel[1], golden_titles)
    else:
        question = resolved.strip().rstrip("?").strip()
        keywords = keyword_form(question)
        keys = [question, keywords]
        q_norm = normalize(question)
        for title in golden_titles:
            short = strip_parenthetical(title)
            if normalize(short) not in q_norm:
                keys.append(f"{short} {keywords}")
    return dedup_keys(keys, forbidden=[answer])


def overlap_keywords(question: str, passage_text: str, exclude: str = "") -> str:
    """Question keywords that occur in the passage (case-insensitive), minus the words of ``exclude``."""
    passage_words = {w.lower() for w in words(passage_text)}
    excluded = {w.lower() for w in words(exclude)}
    picked: list[str] = []
    for w in words(question):
        low = w.lower()
        if low in STOP_WORDS or low in excluded or low not in passage_words or w in picked:
            continue
        picked.append(w)
    return " ".join(picked)


def hotpot_hop_keys(question: str, title: str, support_text: str, first_bridge_hop: bool, answer: str = "") -> list[str]:
    """Keys of one HotpotQA supporting paragraph: its title with the question words its supporting
    sentences contain, the title alone, and (first hop of a bridge question) the question's keywords.
    When the title is the answer (the answer entity's own page), the title keys are dropped and the
    question words are what is left to search with."""
    short = strip_parenthetical(title)
    overlap = overlap_keywords(question, support_text, exclude=title)
    keys = [f"{short} {overlap}".strip(), short]
    if short != title:
        keys.append(title)
    if first_bridge_hop:
        keys.append(keyword_form(question))
    forbidden = [answer] if answer else []
    out = dedup_keys(keys, forbidden=forbidden)
    if not out:
        out = dedup_keys([overlap, keyword_form(question)], forbidden=forbidden)
    return out


def mention_score(title: str, text: str) -> float:
    """Fraction of the title's content words (parenthetical dropped) present in ``text``."""
    title_words = [w.lower() for w in words(strip_parenthetical(title)) if w.lower() not in STOP_WORDS]
    if not title_words:
        return 0.0
    text_words = {w.lower() for w in words(text)}
    return sum(w in text_words for w in title_words) / len(title_words)


def token_f1(a: str, b: str) -> float:
    """Bag-of-tokens F1 of the SQuAD-normalised strings (0 when either is empty)."""
    ta, tb = normalize(a).split(), normalize(b).split()
    if not ta or not tb:
        return 0.0
    common = 0
    remaining = list(tb)
    for t in ta:
        if t in remaining:
            remaining.remove(t)
            common += 1
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)
