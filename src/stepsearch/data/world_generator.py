"""The generated multi-hop world itself: fictional entities and relations, one passage per fact,
and 1–4-hop chain questions with full decompositions; a pure function of :class:`WorldConfig`.

Each :class:`~stepsearch.data.schema.Example` carries its sub-questions in order, each with its
answer, search keys ``K_j`` (the resolved sub-question, a keyword form "X founder", a title+relation
form "X founded by") and golden passage ``g_j`` (by corpus id), in the real pipeline's schema
(METHOD.md §4). The files and the ``data synth`` command are in :mod:`stepsearch.data.synthetic`.

People, cities, regions, countries, organisations, films and books are linked by functional
relations (one object per subject, so every chain has one answer). Each fact is one passage titled
by its subject: a templated fact sentence padded with descriptive sentences that state no relation.
Distractor passages state the same relation about look-alike entities ("Kelvarn Institute" vs
"Kelvarn Guild"). A k-hop question nests k relations ("In which country is the region containing
the birthplace of the founder of Kelvarn Institute?"). Names, padding attributes and relation
templates live in :mod:`stepsearch.data.world_names`.

Determinism: only ``random.Random`` streams seeded from strings (SHA-512, not ``hash()``), lists and
insertion-ordered dicts, so a config gives byte-identical files. The corpus and each split have
their own stream, and test/val are drawn before train, so question counts never move the corpus
and train size never moves val/test. A (start entity, relation chain) pair and a question string
belong to at most one split.
"""

from __future__ import annotations

import collections
import json
import random
from dataclasses import asdict, dataclass, field, fields

from stepsearch.data import world_names as wn
from stepsearch.data.schema import Example, GoldenPassage, SubQuestion
from stepsearch.data.world_names import ENTITY_TYPES, RELATIONS, relation_patterns
from stepsearch.errors import StepSearchError

GENERATOR_VERSION = 1
MAX_HOPS = 4
SPLITS = ("train", "val", "test")


def _hops_field(default: dict[int, float]):
    return field(default_factory=lambda: dict(default))


@dataclass
class WorldConfig:
    """Size and shape of a generated world. The defaults are the offline quickstart's world.

    Hop distributions map a hop count (1–4) to a relative weight; a split gets exactly
    ``round(size * weight / total)`` questions of each hop count (largest remainder). The default
    trains on mostly short chains and evaluates on 2–4 hops: a supervised warm-start on the short
    train chains (filter on ``metadata["hops"]``) leaves the longer chains, seen in train only
    sparsely, as headroom for RL. Sizes give ~1.5k passages and 2000/200/200 questions in well under a second.
    """

    seed: int = 0
    """Seed of every random choice; the same config gives byte-identical files."""
    num_people: int = 240
    """People (born_in a city, works_for an organisation)."""
    num_places: int = 60
    """Cities (in_region a region); every region gets at least one."""
    num_regions: int = 16
    """Regions (in_country a country); every country gets at least one."""
    num_countries: int = 8
    """Countries (capital: one of their cities)."""
    num_orgs: int = 60
    """Organisations (founded_by a person, headquartered_in a city)."""
    num_works: int = 160
    """Works, half films (directed_by, produced_by) and half books (written_by, published_by)."""
    distractors_per_fact: float = 0.5
    """Expected distractor passages per fact: the same relation stated about a look-alike entity."""
    train_size: int = 2000
    """Training questions."""
    val_size: int = 200
    """Validation questions."""
    test_size: int = 200
    """Test questions."""
    train_hops: dict[int, float] = _hops_field({1: 0.35, 2: 0.45, 3: 0.15, 4: 0.05})
    """Hop count → weight for train (mostly 1–2 hops)."""
    val_hops: dict[int, float] = _hops_field({2: 0.5, 3: 0.3, 4: 0.2})
    """Hop count → weight for val (2–4 hops)."""
    test_hops: dict[int, float] = _hops_field({2: 0.5, 3: 0.3, 4: 0.2})
    """Hop count → weight for test (2–4 hops)."""
    padding: bool = True
    """Pad passages with descriptive sentences that state no relation. Off gives one-sentence
    passages: shorter observations, so tiny CPU models train faster (the quickstart)."""

    def __post_init__(self) -> None:
        for name in ("train_hops", "val_hops", "test_hops"):
            setattr(self, name, normalize_hops(getattr(self, name), name))
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("num_")}
        counts.update(train_size=self.train_size, val_size=self.val_size, test_size=self.test_size)
        for name, value in counts.items():
            if not isinstance(value, int) or value < 0:
                raise StepSearchError(f"WorldConfig.{name} must be a non-negative integer, got {value!r}")
        if not 1 <= self.num_countries <= self.num_regions <= self.num_places:
            raise StepSearchError("WorldConfig needs 1 <= num_countries <= num_regions <= num_places "
                                  f"(got {self.num_countries}, {self.num_regions}, {self.num_places})")
        if self.num_people < 1 or self.num_orgs < 1:
            raise StepSearchError("WorldConfig needs at least one person and one organisation")
        if not 0 <= self.distractors_per_fact <= 10:
            raise StepSearchError(f"WorldConfig.distractors_per_fact must be in [0, 10], got {self.distractors_per_fact}")

    def to_json(self) -> dict:
        """JSON-ready form (hop maps as ``[[hops, weight], ...]``); used by the manifest."""
        out = asdict(self)
        for name in ("train_hops", "val_hops", "test_hops"):
            out[name] = [[h, w] for h, w in getattr(self, name).items()]
        return json.loads(json.dumps(out))


def normalize_hops(value, name: str = "hops") -> dict[int, float]:
    """Accept ``{2: 0.5, "3": 0.5}``, ``[[2, 0.5], [3, 0.5]]``, ``[2, 3]`` (uniform) or "2:0.5,3:0.5"."""
    if isinstance(value, str):
        value = [tuple(p.split(":")) if ":" in p else p for p in value.replace(" ", "").split(",") if p]
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = [tuple(v) if isinstance(v, (list, tuple)) else (v, 1.0) for v in value]
    try:
        hops = {int(h): float(w) for h, w in pairs}
    except (TypeError, ValueError):
        raise StepSearchError(f"{name}: expected hop:weight pairs like '2:0.5,3:0.3,4:0.2', got {value!r}") from None
    if not hops or any(not 1 <= h <= MAX_HOPS for h in hops) or any(w < 0 for w in hops.values()) \
            or sum(hops.values()) <= 0:
        raise StepSearchError(f"{name}: hop counts must be in 1..{MAX_HOPS} with non-negative weights "
                              f"summing to > 0, got {value!r}")
    return {h: hops[h] for h in sorted(hops)}


def hop_counts(size: int, hops: dict[int, float]) -> dict[int, int]:
    """Split ``size`` questions over hop counts by weight (largest remainder, ties to fewer hops)."""
    total = sum(hops.values())
    quotas = {h: size * w / total for h, w in hops.items()}
    counts = {h: int(q) for h, q in quotas.items()}
    by_remainder = sorted(hops, key=lambda h: (-(quotas[h] - counts[h]), h))
    for h in by_remainder[: size - sum(counts.values())]:
        counts[h] += 1
    return counts


@dataclass
class Entity:
    """A named thing of the world. Distractor entities exist only in distractor passages."""

    name: str
    type: str
    aliases: list[str] = field(default_factory=list)
    attributes: dict = field(default_factory=dict)
    distractor: bool = False


@dataclass
class Fact:
    """``subject --relation--> object`` and the id of the corpus passage that states it."""

    subject: str
    relation: str
    object: str
    passage_id: str = ""
    distractor: bool = False


@dataclass
class World:
    """A generated world: entities, facts, the corpus rows and the three question splits."""

    config: WorldConfig
    entities: dict[str, Entity]
    facts: list[Fact]
    corpus: list[dict]
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _stream(config: WorldConfig, purpose: str) -> random.Random:
    return random.Random(f"stepsearch-world:{config.seed}:{purpose}")


def _build_entities(config: WorldConfig, rng: random.Random, names: wn.NameRegistry) -> dict[str, list[Entity]]:
    films = (config.num_works + 1) // 2
    sizes = {"country": config.num_countries, "region": config.num_regions, "city": config.num_places,
             "person": config.num_people, "org": config.num_orgs, "film": films,
             "book": config.num_works - films}
    by_type: dict[str, list[Entity]] = {}
    for kind in ENTITY_TYPES:
        by_type[kind] = [Entity(names.new(kind, rng).text, kind, attributes=wn.describe(kind, rng))
                         for _ in range(sizes[kind])]
    return by_type


def _assign_facts(by_type: dict[str, list[Entity]], rng: random.Random) -> list[Fact]:
    """Draw the object of every (subject, relation); every country/region keeps at least one member."""
    objects: dict[tuple[str, str], str] = {}

    def cover(children: list[Entity], parents: list[Entity], relation: str) -> None:
        for i, child in enumerate(children):
            parent = parents[i] if i < len(parents) else rng.choice(parents)
            objects[(child.name, relation)] = parent.name

    cover(by_type["region"], by_type["country"], "in_country")
    cover(by_type["city"], by_type["region"], "in_region")
    cities_of: dict[str, list[str]] = {c.name: [] for c in by_type["country"]}
    for city in by_type["city"]:
        cities_of[objects[(objects[(city.name, "in_region")], "in_country")]].append(city.name)
    for country in by_type["country"]:
        objects[(country.name, "capital")] = rng.choice(cities_of[country.name])
    people = by_type["person"]
    founders = rng.sample(people, len(by_type["org"])) if len(people) >= len(by_type["org"]) else None
    for i, org in enumerate(by_type["org"]):
        objects[(org.name, "founded_by")] = (founders[i] if founders else rng.choice(people)).name
    for rel in RELATIONS.values():
        for subject in by_type[rel.subject_type]:
            if (subject.name, rel.name) not in objects:
                objects[(subject.name, rel.name)] = rng.choice(by_type[rel.object_type]).name
    # One fact list in a fixed order: entity type, entity, relation.
    return [Fact(s.name, rel.name, objects[(s.name, rel.name)])
            for kind in ENTITY_TYPES for s in by_type[kind]
            for rel in RELATIONS.values() if rel.subject_type == kind]


def _passage_text(fact: Fact, entity: Entity, rng: random.Random, padding: bool = True) -> str:
    intro, remark = wn.attribute_sentences(entity.type, entity.name, entity.attributes)
    sentence = rng.choice(RELATIONS[fact.relation].passages).format(s=fact.subject, o=fact.object)
    layout = rng.randrange(3)  # intro+fact, fact+remark, intro+fact+remark: passages vary in length
    if not padding:  # drawn all the same, so the rest of the world does not move
        return sentence
    parts = [intro, sentence] if layout == 0 else [sentence, remark] if layout == 1 else [intro, sentence, remark]
    return " ".join(parts)


def _build_corpus(config: WorldConfig, by_type, facts: list[Fact], rng: random.Random,
                  names: wn.NameRegistry) -> tuple[dict[str, Entity], list[Fact], list[dict]]:
    entities = {e.name: e for kind in ENTITY_TYPES for e in by_type[kind]}
    distractors: list[Fact] = []
    whole, frac = divmod(config.distractors_per_fact, 1)
    for fact in facts:
        subject = entities[fact.subject]
        for _ in range(int(whole) + (rng.random() < frac)):
            lookalike = names.lookalike(names.get(subject.name), rng)
            entities[lookalike.text] = Entity(lookalike.text, subject.type, attributes=wn.describe(subject.type, rng),
                                              distractor=True)
            others = [e for e in by_type[RELATIONS[fact.relation].object_type] if e.name != fact.object]
            obj = rng.choice(others).name if others else fact.object
            distractors.append(Fact(lookalike.text, fact.relation, obj, distractor=True))
    all_facts = facts + distractors
    texts = [(f, _passage_text(f, entities[f.subject], rng, config.padding)) for f in all_facts]
    order = list(range(len(texts)))
    rng.shuffle(order)  # golden and distractor passages interleave in id order
    corpus: list[dict] = []
    for pid, index in enumerate(order):
        fact, text = texts[index]
        fact.passage_id = str(pid)
        corpus.append({"id": str(pid), "contents": f'"{fact.subject}"\n{text}'})
    people = [e for e in entities.values() if e.type == "person"]
    alias_count = collections.Counter(wn.person_alias(p.name) for p in people)
    for person in people:  # the short form is an accepted answer only when it names one person
        if alias_count[wn.person_alias(person.name)] == 1:
            person.aliases = [wn.person_alias(person.name)]
    return entities, all_facts, corpus


def _walk(start: str, pattern: tuple[str, ...], fact_of: dict[tuple[str, str], Fact]) -> list[str] | None:
    """The entities along ``pattern`` from ``start``; ``None`` if the chain revisits an entity."""
    chain = [start]
    for relation in pattern:
        nxt = fact_of[(chain[-1], relation)].object
        if nxt in chain:
            return None
        chain.append(nxt)
    return chain


def _compose(pattern: tuple[str, ...], chain: list[str], fact_of: dict[tuple[str, str], Fact],
             passage_text: dict[str, str], rng: random.Random) -> tuple[str, list[SubQuestion]]:
    """The nested question and its resolved sub-questions (answer, keys, golden passage) in hop order."""
    phrase = chain[0]
    for hop, relation in enumerate(pattern[:-1]):
        # Around a name any form reads well; around a nested phrase only the right-branching
        # first form does ("the city where the founder of X was born" would centre-embed).
        forms = RELATIONS[relation].noun_phrases
        phrase = (rng.choice(forms) if hop == 0 else forms[0]).format(s=phrase)
    question = rng.choice(RELATIONS[pattern[-1]].questions).format(s=phrase)
    subs = []
    for hop, relation in enumerate(pattern):
        rel, subject = RELATIONS[relation], chain[hop]
        sub_question = rng.choice(rel.questions).format(s=subject)
        keys = [sub_question] + [k.format(s=subject) for k in rel.keywords]
        pid = fact_of[(subject, relation)].passage_id
        golden = GoldenPassage(id=pid, title=subject, text=passage_text[pid])
        subs.append(SubQuestion(question=sub_question, answer=chain[hop + 1], search_keys=keys, golden=[golden]))
    return question, subs


def _make_split(world: World, split: str, rng: random.Random, used_chains: set, used_questions: set) -> list[Example]:
    """Draw the split's questions with its hop counts; no chain or question string repeats across splits."""
    size, hops = getattr(world.config, f"{split}_size"), getattr(world.config, f"{split}_hops")
    fact_of = {(f.subject, f.relation): f for f in world.facts if not f.distractor}
    passage_text = {row["id"]: row["contents"].split("\n", 1)[1] for row in world.corpus}
    starts = {kind: [e.name for e in world.entities.values() if e.type == kind and not e.distractor]
              for kind in ENTITY_TYPES}
    drawn: list[tuple[str, list[SubQuestion], dict]] = []
    for n_hops, need in hop_counts(size, hops).items():
        patterns = [p for p in relation_patterns(n_hops) if starts[RELATIONS[p[0]].subject_type]]
        got = tries = 0
        while got < need:
            tries += 1
            if tries > 200 * need + 2000:
                raise StepSearchError(
                    f"could draw only {got} of {need} distinct {n_hops}-hop {split} questions: enlarge the "
                    f"world (num_people, num_works, ...) or lower {split}_size / {split}_hops")
            pattern = rng.choice(patterns)
            start = rng.choice(starts[RELATIONS[pattern[0]].subject_type])
            chain = None if (start, pattern) in used_chains else _walk(start, pattern, fact_of)
            if chain is None:
                continue
            question, subs = _compose(pattern, chain, fact_of, passage_text, rng)
            if question in used_questions:
                continue
            used_chains.add((start, pattern))
            used_questions.add(question)
            metadata = {"hops": n_hops, "relations": list(pattern), "entities": chain,
                        "entity_types": [world.entities[name].type for name in chain], "split": split}
            drawn.append((question, subs, metadata))
            got += 1
    rng.shuffle(drawn)  # hop counts interleave within the split
    return [Example(id=f"world-{world.config.seed}-{split}-{i}", question=question, dataset="synthetic",
                    answers=[meta["entities"][-1]] + world.entities[meta["entities"][-1]].aliases,
                    sub_questions=subs, metadata=meta)
            for i, (question, subs, meta) in enumerate(drawn)]


def generate_world(config: WorldConfig) -> World:
    """Build the world for ``config``: a pure, deterministic function of the config."""
    names = wn.NameRegistry()
    by_type = _build_entities(config, _stream(config, "entities"), names)
    facts = _assign_facts(by_type, _stream(config, "facts"))
    entities, all_facts, corpus = _build_corpus(config, by_type, facts, _stream(config, "passages"), names)
    world = World(config, entities, all_facts, corpus, train=[], val=[], test=[])
    used_chains: set = set()
    used_questions: set = set()
    for split in ("test", "val", "train"):  # held-out splits first: train size does not move them
        setattr(world, split, _make_split(world, split, _stream(config, f"questions-{split}"),
                                          used_chains, used_questions))
    return world


def world_summary(world: World) -> dict:
    """Counts stored in the manifest and shown by the CLI."""
    n_distractor = sum(f.distractor for f in world.facts)
    summary = {"passages": len(world.corpus), "fact_passages": len(world.facts) - n_distractor,
               "distractor_passages": n_distractor,
               "entities": sum(not e.distractor for e in world.entities.values()), "splits": {}}
    for split in SPLITS:
        hist = collections.Counter(str(ex.num_hops) for ex in world.split(split))
        summary["splits"][split] = {"questions": len(world.split(split)), "hops": dict(sorted(hist.items()))}
    return summary
