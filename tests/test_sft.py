"""Supervised warm-start: golden turns, golden trajectories through the real engine and BM25, the
masked SFT loss against a float64 reference, and that a few steps lower it."""

from __future__ import annotations

import pytest
import torch
from training_fixtures import _one_thread, rollout_config, training_env  # noqa: F401  (fixtures)

from stepsearch.data.schema import Example, GoldenPassage, SubQuestion
from stepsearch.errors import StepSearchError
from stepsearch.records.runs import write_fingerprint
from stepsearch.training.bootstrap import run_bootstrap, tiny_fingerprint_settings, warm_start_fingerprint_settings
from stepsearch.training.sft import (
    BootstrapSettings,
    Demonstration,
    TinyModelSettings,
    WarmStartSettings,
    collect_golden_trajectories,
    golden_turns,
    plan_demonstrations,
    run_warm_start,
    sft_loss,
    train_sft,
)


def _two_hop() -> Example:
    return Example(
        id="x", question="Where was the director of Red Harbor born?", answers=["Vaskwick", "Vask"],
        sub_questions=[
            SubQuestion("Who directed Red Harbor?", "Ann Lee", ["Who directed Red Harbor?", "Red Harbor director"]),
            SubQuestion("Where was Ann Lee born?", "Vaskwick", ["Where was Ann Lee born?"]),
        ],
    )


def test_golden_turns_of_a_two_hop_example():
    assert golden_turns(_two_hop()) == [
        "<think> Who directed Red Harbor? </think>\n<search> Who directed Red Harbor? </search>",
        "<think> Where was Ann Lee born? </think>\n<search> Where was Ann Lee born? </search>",
        "<answer> Vaskwick </answer>",
    ]


def test_golden_turns_key_index_and_hops_without_keys():
    example = _two_hop()
    example.sub_questions.insert(1, SubQuestion("A hop nobody can search?", "z", []))
    # key_index picks an alternative phrasing, clamped to the last one a hop has; keyless hops are skipped.
    assert golden_turns(example, key_index=1) == [
        "<think> Who directed Red Harbor? </think>\n<search> Red Harbor director </search>",
        "<think> Where was Ann Lee born? </think>\n<search> Where was Ann Lee born? </search>",
        "<answer> Vaskwick </answer>",
    ]


def test_premature_demonstrations_stop_early_and_answer_what_they_have():
    example = _two_hop()
    # after one search: the entity that hop found (copied from its observation)
    assert golden_turns(example, demo=Demonstration(searches=1, answer="Ann Lee")) == [
        "<think> Who directed Red Harbor? </think>\n<search> Who directed Red Harbor? </search>",
        "<answer> Ann Lee </answer>",
    ]
    assert golden_turns(example, demo=Demonstration(searches=0, answer="Oslo")) == ["<answer> Oslo </answer>"]


def test_plan_demonstrations_adds_guesses_beside_every_golden_one():
    examples = []
    for i in range(40):
        ex = _two_hop()
        ex.id, ex.answers = str(i), [f"city{i}"]
        examples.append(ex)
    assert plan_demonstrations(examples, 0.0) == [(ex, Demonstration()) for ex in examples]
    plans = plan_demonstrations(examples, 0.6, seed=3)
    assert plans == plan_demonstrations(examples, 0.6, seed=3)  # seeded
    golden = [ex for ex, d in plans if d == Demonstration()]
    guesses = [(ex, d) for ex, d in plans if d != Demonstration()]
    assert golden == examples  # every golden demonstration stays, in order
    assert len(guesses) == 60  # round(40 * 0.6 / 0.4): guesses are 60% of all demonstrations
    # each example guessed once before any is guessed twice
    counts = {ex.id: sum(g.id == ex.id for g, _ in guesses) for ex in examples}
    assert set(counts.values()) == {1, 2} and sum(v == 2 for v in counts.values()) == 20
    for ex, d in guesses:
        assert d.searches == 0 and d.answer.startswith("city") and d.answer not in ex.answers
        assert golden_turns(ex, demo=d) == [f"<answer> {d.answer} </answer>"]


def test_guess_fraction_out_of_range_is_a_config_error():
    from stepsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="guess_fraction"):
        WarmStartSettings(guess_fraction=1.0)  # all guesses: nothing golden left to learn from


@pytest.fixture(scope="module")
def tokenizer(training_env):
    from stepsearch.models.loading import load_tokenizer

    return load_tokenizer(training_env.sft_dir)


@pytest.fixture(scope="module")
def two_hop_examples(training_env):
    from stepsearch.data.sources import load_examples

    return [ex for ex in load_examples(training_env.train) if ex.num_hops == 2][:3]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_collect_golden_trajectories_masks_and_filter(training_env, tokenizer, two_hop_examples):
    good = two_hop_examples[:2]
    bad = two_hop_examples[2]
    bad = Example(bad.id, bad.question, bad.answers, bad.dataset,
                  [SubQuestion(sq.question, sq.answer, sq.search_keys, [GoldenPassage("no-such-id", "t", "x")])
                   for sq in bad.sub_questions], bad.metadata)
    batches, kept, dropped = collect_golden_trajectories([good[0], bad, good[1]], tokenizer, training_env.retriever,
                                                         rollout_config(), batch_size=8)
    assert (kept, dropped) == (2, 1)
    (trajectory,) = batches
    assert len(trajectory) == 2
    info_open, info_close = _ids(tokenizer, "<information>"), _ids(tokenizer, "</information>")
    assert len(info_open) == len(info_close) == 1  # tags are single tokens in the tiny tokenizer
    for row, example in enumerate(good):
        record = trajectory.records[row]
        assert [s.query for s in record.steps] == [sq.search_keys[0] for sq in example.sub_questions]
        assert record.answer == example.answers[0]
        ids = trajectory.input_ids[row]
        mask = trajectory.loss_mask[row]
        n = int(trajectory.attention_mask[row].sum())
        start = int(trajectory.prompt_lengths[row])
        # Policy tokens are exactly the scripted turns, in order.
        expected = [t for turn in golden_turns(example) for t in _ids(tokenizer, turn)]
        assert ids[mask.bool()].tolist() == expected
        assert mask[:start].sum() == 0 and mask[n:].sum() == 0
        # Every token of each <information> … </information> block is environment (mask 0).
        opens = (ids[:n] == info_open[0]).nonzero().flatten().tolist()
        closes = (ids[:n] == info_close[0]).nonzero().flatten().tolist()
        opens = [i for i in opens if i >= start]
        closes = [i for i in closes if i >= start]
        assert len(opens) == len(closes) == 2
        for a, b in zip(opens, closes):
            assert mask[a:b + 1].sum() == 0 and b - a > 10
        observed = tokenizer.decode(ids[start:n][mask[start:n] == 0])
        for step in record.steps:
            assert step.passage_titles[0] in observed


def test_premature_demonstrations_through_the_engine(training_env, tokenizer, two_hop_examples):
    first, second = two_hop_examples[:2]
    # The golden check covers only the hops a demonstration searched: a bogus golden passage on the
    # unsearched hop must not drop it.
    second = Example(second.id, second.question, second.answers, second.dataset,
                     [second.sub_questions[0], SubQuestion(second.sub_questions[1].question, second.sub_questions[1].answer,
                                                           second.sub_questions[1].search_keys,
                                                           [GoldenPassage("no-such-id", "t", "x")])], second.metadata)
    demos = [Demonstration(searches=0, answer="Somebody Else"),
             Demonstration(searches=1, answer=second.sub_questions[0].answer)]
    batches, kept, dropped = collect_golden_trajectories([first, second], tokenizer, training_env.retriever,
                                                         rollout_config(), batch_size=8, demos=demos)
    assert (kept, dropped) == (2, 0)
    (trajectory,) = batches
    guess, early = trajectory.records
    assert guess.steps == [] and guess.answer == "Somebody Else"
    assert [s.query for s in early.steps] == [second.sub_questions[0].search_keys[0]]
    assert early.answer == second.sub_questions[0].answer
    for row, (example, demo) in enumerate(zip([first, second], demos)):
        policy_tokens = trajectory.input_ids[row][trajectory.loss_mask[row].bool()].tolist()
        assert policy_tokens == [t for turn in golden_turns(example, demo=demo) for t in _ids(tokenizer, turn)]


def test_sft_loss_matches_a_float64_reference(training_env, tokenizer, two_hop_examples):
    from stepsearch.models.loading import load_policy

    model, _ = load_policy(training_env.sft_dir, device="cpu")
    (trajectory,), _, _ = collect_golden_trajectories(two_hop_examples[:2], tokenizer, training_env.retriever,
                                                      rollout_config())
    ids, attn, mask = trajectory.input_ids, trajectory.attention_mask, trajectory.loss_mask
    with torch.no_grad():
        loss = sft_loss(model, ids, attn, mask)
        logits = model(input_ids=ids, attention_mask=attn).logits.double()
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for i in range(1, ids.shape[1]):
            if mask[b, i]:
                total -= torch.log_softmax(logits[b, i - 1], -1)[ids[b, i]].item()
                count += 1
    assert count == int(mask.sum())
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_a_few_sft_steps_lower_the_loss(training_env, tokenizer, two_hop_examples):
    from stepsearch.models.loading import load_policy

    model, _ = load_policy(training_env.tiny_dir, device="cpu")  # the untrained base
    batches, kept, _ = collect_golden_trajectories(two_hop_examples, tokenizer, training_env.retriever, rollout_config())
    assert kept == 3
    (trajectory,) = batches
    args = (trajectory.input_ids, trajectory.attention_mask, trajectory.loss_mask)
    with torch.no_grad():
        before = sft_loss(model, *args).item()
    torch.manual_seed(0)
    losses = train_sft(model, batches, WarmStartSettings(epochs=8, lr=1e-2, batch_size=3))
    assert len(losses) == 8
    with torch.no_grad():
        after = sft_loss(model, *args).item()
    assert after < 0.8 * before
    assert losses[-1] < losses[0]
    assert not model.training  # handed back in eval mode, as rollouts expect


def test_warm_start_rejects_limits_the_golden_turns_do_not_fit(training_env):
    from stepsearch.data.sources import load_examples

    examples = load_examples(training_env.train)
    with pytest.raises(StepSearchError, match="max_response_tokens=4"):
        run_warm_start(str(training_env.tiny_dir), training_env.world_dir.parent / "never", examples,
                       training_env.retriever, rollout_config(max_response_tokens=4), WarmStartSettings(hops=[1, 2]))
    assert not (training_env.world_dir.parent / "never").exists()


def test_bootstrap_is_idempotent(training_env):
    watched = [training_env.tiny_dir / "config.json", training_env.sft_dir / "config.json",
               training_env.sft_dir / "model.safetensors"]
    stamps = [p.stat().st_mtime_ns for p in watched]
    tiny = TinyModelSettings(out_dir=str(training_env.tiny_dir), corpus_files=[])
    warm = WarmStartSettings(data=[str(training_env.train)])
    settings = BootstrapSettings(tiny=tiny, warm_start=warm)
    # The session's artefacts were made directly (not by a bootstrap): without a fingerprint beside
    # them the bootstrap refuses to reuse them, as it must for a directory of unknown origin.
    with pytest.raises(StepSearchError, match="made by unknown settings"):
        run_bootstrap(settings, str(training_env.sft_dir), rollout_config(), datamodule=None)
    # Stamped with the settings that (here, by declaration) made them, they are reused as they are.
    write_fingerprint(training_env.tiny_dir, tiny_fingerprint_settings(tiny), "tiny model")
    write_fingerprint(training_env.sft_dir, warm_start_fingerprint_settings(warm, str(training_env.tiny_dir),
                                                                            rollout_config(), None), "warm-started policy")
    run_bootstrap(settings, str(training_env.sft_dir), rollout_config(), datamodule=None)  # nothing to redo
    assert [p.stat().st_mtime_ns for p in watched] == stamps
    # Another setting for the same directory is refused in one line naming the field, never reused.
    changed = BootstrapSettings(tiny=TinyModelSettings(out_dir=str(training_env.tiny_dir), corpus_files=[],
                                                       hidden_size=tiny.hidden_size * 2), warm_start=warm)
    with pytest.raises(StepSearchError, match="changed: hidden_size"):
        run_bootstrap(changed, str(training_env.sft_dir), rollout_config(), datamodule=None)
    assert [p.stat().st_mtime_ns for p in watched] == stamps


def test_warm_start_summary_of_the_session_model(training_env):
    summary = training_env.warm_summary
    assert summary["kept"] > 0 and summary["kept"] + summary["dropped_missed_golden"] == summary["demonstrations"]
    assert summary["last_loss"] < summary["first_loss"]
    assert (training_env.sft_dir / "warm_start.json").exists()
