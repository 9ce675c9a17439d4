"""Search-key generation: pure functions, checked against hand-written expectations."""

from __future__ import annotations

import pytest

from stepsearch.data import keys


def test_normalize_is_squad_normalisation():
    assert keys.normalize("The  Rock's, a Band!") == "rocks band"
    assert keys.normalize("An apple") == "apple"


def test_keyword_form_drops_stop_words_and_relation_marker():
    assert keys.keyword_form("What event caused Robert Menzies to become Prime Minister?") == "event caused Robert Menzies become Prime Minister"
    assert keys.keyword_form("Van Hook Township >> located in the administrative territorial entity") == "Van Hook Township located administrative territorial entity"
    assert keys.keyword_form("Who was the Liberal Party of Australia's longest-serving leader?") == "Liberal Party Australia's longest-serving leader"


def test_resolve_references_uses_earlier_answers():
    assert keys.resolve_references("What was the #1 of #2 's era later known as?", ["Latin", "Charlemagne"]) == "What was the Latin of Charlemagne 's era later known as?"
    assert keys.references("#2 >> shares border with #1") == [2, 1]


@pytest.mark.parametrize("text,answers", [("#3 >> capital", ["a", "b"]), ("#0 >> capital", ["a"]), ("#1 >> capital", [])])
def test_unresolvable_reference_raises(text, answers):
    with pytest.raises(ValueError, match="does not refer to an earlier"):
        keys.resolve_references(text, answers)


def test_reference_to_empty_answer_raises():
    with pytest.raises(ValueError, match="without an answer"):
        keys.resolve_references("#1 >> capital", [" "])


def test_musique_relation_keys():
    got = keys.musique_keys("Mountrail County >> capital", ["Mountrail County Courthouse"], answer="Stanley")
    assert got == ["Mountrail County capital", "capital of Mountrail County", "Mountrail County Courthouse capital"]
    # the relation paraphrase table adds a natural phrasing
    got = keys.musique_keys("Anna Benson >> spouse", ["Anna Benson"], answer="Kris Benson")
    assert got == ["Anna Benson spouse", "spouse of Anna Benson", "Anna Benson married to"]


def test_musique_natural_question_keys():
    got = keys.musique_keys("What event caused Robert Menzies to become Prime Minister?", ["Robert Menzies"], answer="Lyons' death in 1939")
    assert got == ["What event caused Robert Menzies to become Prime Minister", "event caused Robert Menzies become Prime Minister"]
    got = keys.musique_keys("Who became the top PC manufacturer in 1994?", ["Compaq"], answer="Apple")
    assert got[-1] == "Compaq became top PC manufacturer 1994"


def test_keys_never_contain_the_hop_answer():
    got = keys.musique_keys(
        "Van Hook Township >> located in the administrative territorial entity",
        ["Van Hook Township, Mountrail County, North Dakota"],
        answer="Mountrail County",
    )
    assert got and not any("mountrail county" in keys.normalize(k) for k in got)


def test_dedup_keys_under_normalisation():
    assert keys.dedup_keys(["The Rock", "rock", "  ", "Rock band?"]) == ["The Rock", "Rock band"]


def test_hotpot_keys_fall_back_to_question_words_when_title_is_answer():
    got = keys.hotpot_hop_keys(
        "Lorenzo Monaco was influenced by which Italian painter and architect?",
        "Giotto",
        "Giotto di Bondone was an Italian painter and architect from Florence.",
        first_bridge_hop=False,
        answer="Giotto",
    )
    assert got == ["Italian painter architect", "Lorenzo Monaco influenced Italian painter architect"]


def test_relation_keys_with_disambiguated_title():
    got = keys.relation_keys("The Zone", "director", ["The Zone (2017 film)"])
    assert got[:3] == ["The Zone director", "director of The Zone", "The Zone directed by"]
    assert "The Zone (2017 film) director" in got


def test_mention_score_and_token_f1_by_hand():
    assert keys.mention_score("Tottenham Hotspur F.C.", "played for Tottenham Hotspur") == pytest.approx(2 / 3)
    # "the big red dog" vs "big dog": normalised tokens [big, red, dog] vs [big, dog]: p=2/3, r=1
    assert keys.token_f1("the big red dog", "big dog") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert keys.token_f1("", "x") == 0.0
