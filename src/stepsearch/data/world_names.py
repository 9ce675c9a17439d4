"""Vocabulary of the generated multi-hop world (:mod:`stepsearch.data.synthetic`): fictional names
built from syllable inventories, the descriptive attributes that pad passages, and the relations
with their surface forms (passage sentences, questions, nested noun phrases, keyword keys).

Names are concatenations of invented syllables ("Vor"+"enthal" "Qu"+"ibrick", "Ost"+"mere",
"Kel"+"varn Institute"), so a BPE tokenizer splits them into shared sub-word pieces and a model
cannot lean on real-world knowledge. Each name is a tuple of *slots* (one choice per inventory);
redrawing one slot gives a look-alike ("Vorenthal Quibrick" → "Vorenthal Quiommel"), which the
world uses for confusable distractor passages. :class:`NameRegistry` keeps every full name unique
and every invented word owned by one entity type, so no entity's name occurs inside another's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from stepsearch.errors import StepSearchError

# Syllable inventories per entity type. Kept disjoint in spirit (different onsets per type) and
# screened by hand against common real names and words ("Corvette", "Fennel", "Orford" ...).
GIVEN_ONSETS = ("Vor", "Kel", "Ost", "Quel", "Thar", "Ysk", "Bral", "Mirr", "Zen", "Corv", "Elb", "Fask",
                "Grev", "Hol", "Jarv", "Lisk", "Nev", "Pell", "Ruv", "Sev", "Tamr", "Uld", "Wen", "Xan")
GIVEN_ENDINGS = ("enthal", "arix", "ivo", "isse", "oric", "unel", "athel", "imar", "eskin", "wyth",
                 "odrin", "aeve")
FAMILY_PREFIXES = ("Qu", "Tambl", "Vand", "Hesk", "Morv", "Crell", "Oss", "Brin", "Stav", "Yarr", "Dulc",
                   "Grisk", "Plov", "Zill", "Anv", "Thr")
FAMILY_SUFFIXES = ("ibrick", "avane", "ostrom", "emund", "orvath", "ulix", "eddow", "iskard", "aquin",
                   "ommel", "yndt", "ozar")
CITY_PREFIXES = ("Ost", "Vask", "Kelv", "Dorv", "Yss", "Quar", "Thel", "Mav", "Orv", "Sarn", "Vey", "Wyth",
                 "Zor", "Halv", "Prax", "Brev")
CITY_SUFFIXES = ("mere", "vale", "hollow", "ford", "stead", "wick", "garth", "moor", "holm", "reach",
                 "fell", "haven")
REGION_PREFIXES = ("Aurel", "Breskan", "Corvad", "Drumel", "Estrav", "Fenmor", "Galdr", "Hyrk", "Iskel",
                   "Jorvan", "Kestr", "Lombr")
REGION_SUFFIXES = ("ovia", "enmark", "adel", "ureth", "esse", "ikand")
COUNTRY_PREFIXES = ("Vess", "Korv", "Thal", "Aldr", "Myr", "Quess", "Drav", "Zanth", "Obr", "Kesh", "Ulv",
                    "Nym")
COUNTRY_SUFFIXES = ("aria", "onia", "orra", "uvia", "elland", "istan")
ORG_ONSETS = ("Kel", "Dros", "Auv", "Omb", "Tesk", "Valq", "Prim", "Zeth", "Quor", "Lum", "Narv", "Ebb")
ORG_CODAS = ("varn", "sket", "rine", "risk", "alen", "uor", "ast", "eth", "ivo", "ande")
ORG_KINDS = ("Institute", "Guild", "Foundry", "Collective", "Academy", "Syndicate", "Conservatory",
             "Society", "Observatory", "Trust", "Consortium", "Atelier")
WORK_ONSETS = ("Vask", "Orre", "Thimb", "Quill", "Zabr", "Morr", "Glav", "Istr", "Carv", "Dwel", "Hask",
               "Yvr")
WORK_CODAS = ("elun", "ine", "ost", "amar", "ith", "uun", "ora", "ix")
FILM_NOUNS = ("Nocturne", "Reckoning", "Vigil", "Tides", "Lantern", "Harvest", "Masquerade", "Crossing",
              "Requiem", "Mirage")
BOOK_NOUNS = ("Codex", "Chronicle", "Almanac", "Letters", "Testament", "Ledger", "Atlas", "Primer",
              "Canticle", "Bestiary")
ORG_PATTERNS = ("{stem} {kind}", "{stem} {kind}", "{kind} of {stem}")
WORK_PATTERNS = ("The {stem} {noun}", "{noun} of {stem}")

# entity type -> the slot inventories its names are drawn from.
SLOTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "person": (GIVEN_ONSETS, GIVEN_ENDINGS, FAMILY_PREFIXES, FAMILY_SUFFIXES),
    "city": (CITY_PREFIXES, CITY_SUFFIXES),
    "region": (REGION_PREFIXES, REGION_SUFFIXES),
    "country": (COUNTRY_PREFIXES, COUNTRY_SUFFIXES),
    "org": (ORG_ONSETS, ORG_CODAS, ORG_KINDS, ORG_PATTERNS),
    "film": (WORK_ONSETS, WORK_CODAS, FILM_NOUNS, WORK_PATTERNS),
    "book": (WORK_ONSETS, WORK_CODAS, BOOK_NOUNS, WORK_PATTERNS),
}
# The invented words of a name belong to one "word family": places share one (so "Ostmere" cannot
# be both a city and a region), films and books share one (their stems come from one inventory).
WORD_FAMILY = {"person": "person", "city": "place", "region": "place", "country": "place", "org": "org",
               "film": "work", "book": "work"}

# Descriptive attributes: padding sentences that state no relation (they avoid the relation words
# born/work/found/headquarters/located/country/capital/direct/produce/write/publish).
OCCUPATIONS = ("cartographer", "glassblower", "composer", "botanist", "archivist", "engineer",
               "playwright", "astronomer", "lutenist", "surveyor", "clockmaker", "physician",
               "sculptor", "linguist", "navigator", "chemist")
PERSON_TRAITS = ("meticulous field notes", "a long series of public lectures", "an unusual collection of maps",
                 "patient restoration of old instruments", "a sharp wit in debate",
                 "a lifelong interest in tidal patterns", "careful translations of old ballads",
                 "a generous mentoring of apprentices")
SECTORS = ("research", "trade", "engineering", "arts", "shipping", "medical", "scholarly", "agricultural")
ORG_TRAITS = ("its annual lantern fair", "a vast archive of letters", "strict apprenticeship rules",
              "a distinctive green seal", "public lectures every spring", "an early printing press")
CITY_KINDS = ("market town", "port city", "river town", "hill town", "walled city", "mining town")
CITY_TRAITS = ("its copper-roofed bell tower", "a busy autumn market", "narrow stone bridges",
               "a famous salt exchange", "terraced orchards", "a lighthouse older than its walls")
REGION_KINDS = ("highland province", "coastal province", "river valley province", "forested province",
                "marshland province", "plateau province")
REGION_TRAITS = ("its wind-swept moors", "long barley fields", "a chain of glacial lakes",
                 "dense pine forests", "salt marshes", "a network of canals")
COUNTRY_KINDS = ("republic", "kingdom", "principality", "federation", "grand duchy", "commonwealth")
COUNTRY_TRAITS = ("its mountain railways", "an ancient parliament", "a tradition of glass art",
                  "wide river deltas", "a long coastline", "its winter festivals")
FILM_GENRES = ("drama", "mystery", "adventure", "comedy", "thriller", "romance", "war", "musical")
BOOK_GENRES = ("historical", "philosophical", "satirical", "pastoral", "gothic", "epistolary")
BOOK_KINDS = ("novel", "treatise", "memoir", "verse collection", "travelogue")


def with_article(phrase: str) -> str:
    """``phrase`` with "a" or "an" ("an astronomer", "a drama film")."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def render(kind: str, slots: tuple[str, ...]) -> str:
    """The display name of a ``kind`` entity with these slot choices."""
    if kind == "person":
        return f"{slots[0]}{slots[1]} {slots[2]}{slots[3]}"
    if kind in ("city", "region", "country"):
        return f"{slots[0]}{slots[1]}"
    if kind == "org":
        return slots[3].format(stem=slots[0] + slots[1], kind=slots[2])
    if kind in ("film", "book"):
        return slots[3].format(stem=slots[0] + slots[1], noun=slots[2])
    raise ValueError(f"unknown entity type {kind!r}")


def invented_words(kind: str, slots: tuple[str, ...]) -> tuple[str, ...]:
    """The made-up words of a name (the parts the registry keeps owned by one word family)."""
    if kind == "person":
        return (slots[0] + slots[1], slots[2] + slots[3])
    return (slots[0] + slots[1],)


def person_alias(name: str) -> str:
    """Short form of a person's name: initial and family name ("Vorenthal Quibrick" → "V. Quibrick")."""
    given, family = name.split(" ", 1)
    return f"{given[0]}. {family}"


@dataclass(frozen=True)
class Name:
    """A generated name: its entity type, slot choices and display form."""

    kind: str
    slots: tuple[str, ...]
    text: str


class NameRegistry:
    """Draws unique names; every invented word stays within one word family.

    All choices go through the ``rng`` passed in, so a fixed seed gives the same names.
    """

    def __init__(self) -> None:
        self._names: dict[str, Name] = {}
        self._word_family: dict[str, str] = {}

    def __contains__(self, text: str) -> bool:
        return text in self._names

    def get(self, text: str) -> Name:
        return self._names[text]

    def _accepts(self, kind: str, slots: tuple[str, ...], text: str) -> bool:
        if text in self._names:
            return False
        family = WORD_FAMILY[kind]
        return all(self._word_family.get(w, family) == family for w in invented_words(kind, slots))

    def _register(self, kind: str, slots: tuple[str, ...], text: str) -> Name:
        name = Name(kind, slots, text)
        self._names[text] = name
        for word in invented_words(kind, slots):
            self._word_family[word] = WORD_FAMILY[kind]
        return name

    def new(self, kind: str, rng: random.Random, max_tries: int = 2000) -> Name:
        """A fresh name of type ``kind`` with every slot drawn at random."""
        inventories = SLOTS[kind]
        for _ in range(max_tries):
            slots = tuple(rng.choice(inv) for inv in inventories)
            text = render(kind, slots)
            if self._accepts(kind, slots, text):
                return self._register(kind, slots, text)
        raise StepSearchError(
            f"ran out of distinct {kind} names after {max_tries} tries: lower the number of {kind} "
            "entities (or distractors) in the synthetic WorldConfig"
        )

    def lookalike(self, of: Name, rng: random.Random, max_tries: int = 200) -> Name:
        """A fresh name sharing all slots but one with ``of`` (a confusable near-duplicate).

        Falls back to a fresh random name when every one-slot variant is taken.
        """
        inventories = SLOTS[of.kind]
        for _ in range(max_tries):
            slot = rng.randrange(len(inventories))
            slots = list(of.slots)
            slots[slot] = rng.choice(inventories[slot])
            text = render(of.kind, tuple(slots))
            if self._accepts(of.kind, tuple(slots), text):
                return self._register(of.kind, tuple(slots), text)
        return self.new(of.kind, rng)


def describe(kind: str, rng: random.Random) -> dict[str, object]:
    """Random descriptive attributes of an entity of type ``kind`` (used only for padding text)."""
    if kind == "person":
        return {"occupation": rng.choice(OCCUPATIONS), "trait": rng.choice(PERSON_TRAITS)}
    if kind == "org":
        return {"sector": rng.choice(SECTORS), "members": rng.randrange(20, 900, 10),
                "trait": rng.choice(ORG_TRAITS)}
    if kind == "city":
        return {"kind": rng.choice(CITY_KINDS), "population": rng.randrange(2000, 400000, 500),
                "trait": rng.choice(CITY_TRAITS)}
    if kind == "region":
        return {"kind": rng.choice(REGION_KINDS), "trait": rng.choice(REGION_TRAITS)}
    if kind == "country":
        return {"kind": rng.choice(COUNTRY_KINDS), "trait": rng.choice(COUNTRY_TRAITS)}
    if kind == "film":
        return {"year": rng.randrange(1921, 2020), "genre": rng.choice(FILM_GENRES),
                "minutes": rng.randrange(78, 181)}
    if kind == "book":
        return {"year": rng.randrange(1790, 2020), "genre": rng.choice(BOOK_GENRES),
                "book_kind": rng.choice(BOOK_KINDS), "pages": rng.randrange(90, 900)}
    raise ValueError(f"unknown entity type {kind!r}")


def attribute_sentences(kind: str, name: str, attrs: dict) -> tuple[str, str]:
    """Two padding sentences (an introduction and a remark) about an entity."""
    if kind == "person":
        return f"{name} is {with_article(attrs['occupation'])}.", f"{name} is known for {attrs['trait']}."
    if kind == "org":
        return (f"{name} is {with_article(attrs['sector'])} organisation with about {attrs['members']} members.",
                f"{name} is known for {attrs['trait']}.")
    if kind == "city":
        return (f"{name} is {with_article(attrs['kind'])} of about {attrs['population']} inhabitants.",
                f"{name} is known for {attrs['trait']}.")
    if kind in ("region", "country"):
        return f"{name} is {with_article(attrs['kind'])}.", f"{name} is known for {attrs['trait']}."
    if kind == "film":
        return (f"{name} is a {attrs['year']} {attrs['genre']} film.",
                f"{name} runs for {attrs['minutes']} minutes.")
    if kind == "book":
        return (f"{name} is {with_article(attrs['genre'])} {attrs['book_kind']} from {attrs['year']}.",
                f"{name} runs to {attrs['pages']} pages.")
    raise ValueError(f"unknown entity type {kind!r}")


# ------------------------------------------------------------------ relations and their surface forms
# Every relation is functional (one object per subject), so every chain question has one answer.
# Each passage template states the fact with a word a question or key also uses (born, founded,
# headquarters, region, country, capital, ...), so BM25 can tell an entity's passages apart.

@dataclass(frozen=True)
class Relation:
    """A functional relation with its surface forms. ``{s}`` is the subject, ``{o}`` the object."""

    name: str
    subject_type: str
    object_type: str
    passages: tuple[str, ...]  # fact sentences
    questions: tuple[str, ...]  # "{s}" may be a name or a nested noun phrase
    noun_phrases: tuple[str, ...]  # "the founder of {s}": the object, described through the subject
    keywords: tuple[str, str]  # keyword form, title+relation form


RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation("born_in", "person", "city",
             ("{s} was born in {o}.", "The birthplace of {s} is the city of {o}.",
              "Born in {o}, {s} grew up near its old quarter."),
             ("Where was {s} born?", "In which city was {s} born?", "What is the birthplace of {s}?"),
             ("the birthplace of {s}", "the city where {s} was born"),
             ("{s} birthplace", "{s} born in")),
    Relation("works_for", "person", "org",
             ("{s} works for {o}.", "{s} is employed by {o}.", "The employer of {s} is {o}."),
             ("Which organisation does {s} work for?", "Who is the employer of {s}?", "Where does {s} work?"),
             ("the employer of {s}", "the organisation that {s} works for"),
             ("{s} employer", "{s} works for")),
    Relation("founded_by", "org", "person",
             ("{s} was founded by {o}.", "{o} founded {s}.", "{s} was established by its founder, {o}."),
             ("Who founded {s}?", "Who is the founder of {s}?", "By whom was {s} founded?"),
             ("the founder of {s}", "the person who founded {s}"),
             ("{s} founder", "{s} founded by")),
    Relation("headquartered_in", "org", "city",
             ("{s} is headquartered in {o}.", "The headquarters of {s} are in {o}.",
              "{s} has its headquarters in the city of {o}."),
             ("Where is {s} headquartered?", "In which city is {s} headquartered?",
              "Where are the headquarters of {s}?"),
             ("the headquarters city of {s}", "the city where {s} is headquartered"),
             ("{s} headquarters", "{s} headquartered in")),
    Relation("in_region", "city", "region",
             ("{s} lies in the region of {o}.", "{s} is located in the region of {o}.",
              "{s} belongs to the region of {o}."),
             ("In which region is {s} located?", "Which region is {s} in?", "What region does {s} belong to?"),
             ("the region containing {s}", "the region where {s} lies"),
             ("{s} region", "{s} located in region")),
    Relation("in_country", "region", "country",
             ("{s} is a region in the country of {o}.", "{s} is part of the country of {o}.",
              "{s} lies within the borders of the country {o}."),
             ("In which country is {s}?", "Which country is {s} part of?", "What country does {s} lie in?"),
             ("the country containing {s}", "the country that {s} is part of"),
             ("{s} country", "{s} part of country")),
    Relation("capital", "country", "city",
             ("The capital of {s} is {o}.", "{o} is the capital of {s}.", "{s} is governed from its capital, {o}."),
             ("What is the capital of {s}?", "Which city is the capital of {s}?",
              "What city serves as the capital of {s}?"),
             ("the capital of {s}", "the capital city of {s}"),
             ("{s} capital", "capital of {s}")),
    Relation("directed_by", "film", "person",
             ("{s} was directed by {o}.", "{o} directed {s}.", "{s} is a film by director {o}."),
             ("Who directed {s}?", "Who is the director of {s}?", "Which filmmaker directed {s}?"),
             ("the director of {s}", "the person who directed {s}"),
             ("{s} director", "{s} directed by")),
    Relation("produced_by", "film", "org",
             ("{s} was produced by {o}.", "{o} produced {s}.", "{s} was a production of {o}."),
             ("Which organisation produced {s}?", "Who produced {s}?", "What is the production company of {s}?"),
             ("the producer of {s}", "the organisation that produced {s}"),
             ("{s} producer", "{s} produced by")),
    Relation("written_by", "book", "person",
             ("{s} was written by {o}.", "{o} wrote {s}.", "{s} is a book by the author {o}."),
             ("Who wrote {s}?", "Who is the author of {s}?", "Who was {s} written by?"),
             ("the author of {s}", "the person who wrote {s}"),
             ("{s} author", "{s} written by")),
    Relation("published_by", "book", "org",
             ("{s} was published by {o}.", "{o} published {s}.", "{s} appeared under the imprint of {o}."),
             ("Which organisation published {s}?", "Who published {s}?", "Who is the publisher of {s}?"),
             ("the publisher of {s}", "the organisation that published {s}"),
             ("{s} publisher", "{s} published by")),
)}
ENTITY_TYPES = ("country", "region", "city", "person", "org", "film", "book")


def relation_patterns(hops: int) -> list[tuple[str, ...]]:
    """Every type-consistent chain of ``hops`` relations, in a fixed order."""
    chains: list[tuple[str, ...]] = [(r,) for r in RELATIONS]
    for _ in range(hops - 1):
        chains = [c + (r,) for c in chains for r in RELATIONS
                  if RELATIONS[r].subject_type == RELATIONS[c[-1]].object_type]
    return chains
