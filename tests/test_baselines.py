"""The field's baselines (``direct``/``rag`` = FlashRAG's naive generation and standard RAG): the prompt
byte for byte through a real chat template, the prompt ids the backend is fed, first-line answers,
the configured rollout backend, and the acceptance run of ``evaluate`` on SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest
from training_fixtures import _one_thread, rollout_config, training_env  # noqa: F401  (fixtures)

from stepsearch.errors import StepSearchError

DIRECT = ("Answer the question based on your own knowledge. Only give me the answer and do not output any "
          "other words.")
RAG_HEAD = ("Answer the question based on the given document.Only give me the answer and do not output any "
            "other words.\nThe following are given documents.\n\n")


def _chatml(system: str, question: str) -> str:  # Qwen2.5's / SmolLM2's ChatML, written out by hand
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nQuestion: {question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def test_prompts_are_flashrags_through_the_chat_template(qwen25_tokenizer):
    from stepsearch.evaluation.loop import baseline_prompt, first_line
    from stepsearch.retrieval.base import Passage

    tok = qwen25_tokenizer
    question = "who wrote the opera Carmen"
    # The instruction replaces Qwen2.5's default system prompt ("You are Qwen, ...").
    assert baseline_prompt(question, tok) == _chatml(DIRECT, question)
    passages = [Passage("p1", "Carmen", "Carmen is an opera by Georges Bizet."),
                Passage("p2", "Georges Bizet", "Bizet was a French composer.\nHe died in 1875.")]
    reference = ('Doc 1(Title: "Carmen") Carmen is an opera by Georges Bizet.\n'
                 'Doc 2(Title: "Georges Bizet") Bizet was a French composer.\nHe died in 1875.\n')
    assert baseline_prompt(question, tok, passages) == _chatml(RAG_HEAD + reference, question)
    # Without a chat template: FlashRAG's fallback, system and user joined by a blank line.
    assert baseline_prompt(question, tok, use_chat_template=False) == f"{DIRECT}\n\nQuestion: {question}"
    assert first_line("  Georges Bizet\nHe wrote it in 1875.") == "Georges Bizet"
    assert first_line("\n\nBizet") == "Bizet" and first_line("") == ""


def test_baselines_feed_that_prompt_and_score_the_first_line(training_env, qwen25_tokenizer):
    """A scripted model on the real Qwen2.5 tokenizer answers "gold\\nexplanation": the backend is fed the
    prompt's ids exactly, the answer is the first line (EM 1), rag retrieves the question's top 5."""
    from stepsearch.data.sources import load_examples
    from stepsearch.evaluation.loop import evaluate_examples, method_engine
    from stepsearch.rewards import RewardConfig
    from stepsearch.rollout.factory import build_engine
    from stepsearch.rollout.scripted import ScriptedPolicy

    tok = qwen25_tokenizer
    examples = load_examples(training_env.val)[:3]
    scripts = [(ex.question, [f"{ex.answers[0]}\nIt says so in the documents."]) for ex in examples]
    engine = build_engine(rollout_config(), ScriptedPolicy(tok, scripts), tok, training_env.retriever)
    fed = []
    generate_turn = engine._generate_turn
    engine._generate_turn = lambda keys, contexts, limits, greedy: fed.append((contexts, limits)) or generate_turn(
        keys, contexts, limits, greedy)
    for method in ("direct", "rag"):
        fed.clear()
        acc, rows = evaluate_examples(method_engine(method, engine), examples, RewardConfig(), batch_size=3)
        (contexts, limits), = fed
        assert limits == [32, 32, 32]
        for ex, context, row in zip(examples, contexts, rows):
            found = training_env.retriever.search([ex.question], 5)[0] if method == "rag" else []
            system = DIRECT if method == "direct" else RAG_HEAD + "".join(
                f'Doc {i}(Title: "{p.title}") {p.text}\n' for i, p in enumerate(found, 1))
            assert context == tok(_chatml(system, ex.question), add_special_tokens=False)["input_ids"]
            assert row["prediction"] == ex.answers[0] and row["em"] == 1.0
            assert row["response"].startswith(ex.answers[0] + "\nIt says so")
            assert [s["ids"] for s in row["searches"]] == ([[p.id for p in found]] if method == "rag" else [])
        assert acc.compute("t")["t/em"] == 1.0


def test_evaluate_and_ask_build_the_configured_backend(training_env, tmp_path, monkeypatch, capsys):
    """The backend comes from the policy's rollout settings through rollout.factory.build_engine."""
    import argparse

    from stepsearch.commands.evaluate import POLICY_CARD, Suite, run_ask, run_suite
    from stepsearch.rollout import factory

    built = []
    real = factory.build_engine

    def spy(config, model, tokenizer, retriever, *, model_path=None):
        built.append((config.backend, model_path))
        config.backend = "hf"  # generate with the HF engine all the same (no vLLM start here)
        return real(config, model, tokenizer, retriever, model_path=model_path)

    monkeypatch.setattr(factory, "build_engine", spy)
    import shutil
    from dataclasses import asdict

    policy = tmp_path / "policy"
    shutil.copytree(training_env.sft_dir, policy)
    (policy / POLICY_CARD).write_text(json.dumps({"rollout": {**asdict(rollout_config()), "backend": "vllm"}}))
    suite = Suite(benchmarks={"v": str(training_env.val)}, models={"p": str(policy)}, methods=["direct", "agent"],
                  index=str(training_env.index_dir), sample=2, output_dir=str(tmp_path / "o"), experiment="")
    run_suite(suite)
    assert built == [("vllm", str(policy))]  # one engine per model, shared by its methods
    question = json.loads(training_env.val.read_text().splitlines()[0])["question"]
    args = argparse.Namespace(question=question, model=str(policy), index=str(training_env.index_dir), url=None,
                              method="rag", template=None, max_turns=None, dtype="float32")
    assert run_ask(args) == 0 and built[-1] == ("vllm", str(policy))
    out = capsys.readouterr().out
    assert "  retrieved: " in out and "turn 1: " in out


def test_missing_model_directory_is_one_line(tmp_path, training_env):
    from stepsearch.commands.evaluate import check_model_source, load_suite

    with pytest.raises(StepSearchError, match=r"^model runs/no-such-run/policy: no such model directory$"):
        load_suite(None, {"benchmarks": {"v": str(training_env.val)}, "models": {"m": "runs/no-such-run/policy"}})
    with pytest.raises(StepSearchError, match="no such model directory"):
        check_model_source(str(tmp_path / "missing"))
    check_model_source("Qwen/Qwen2.5-3B-Instruct")  # a hub id passes through (no "Qwen" folder here)
    check_model_source(str(training_env.sft_dir))


@pytest.mark.slow
def test_smollm2_direct_and_rag_score_on_hotpotqa(smollm2_dir, raw_dir, tmp_path, capsys):
    """Acceptance (issue 17): `evaluate --method direct rag` with SmolLM2-135M-Instruct on 12 HotpotQA
    questions over a BM25 index of their paragraphs: non-zero F1 for both; predictions re-score."""
    from stepsearch.cli import main
    from stepsearch.evaluation.metrics import f1_score
    from stepsearch.retrieval.index import build_index

    rows = json.loads((raw_dir / "hotpot_dev_distractor_sample.json").read_text())[:12]
    bench = tmp_path / "hotpot.json"
    bench.write_text(json.dumps(rows))
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as handle:
        for r, row in enumerate(rows):
            for p, (title, sentences) in enumerate(row["context"]):
                handle.write(json.dumps({"id": f"{r}-{p}", "contents": f'"{title}"\n{"".join(sentences)}'}) + "\n")
    index = build_index(corpus, tmp_path / "index", kind="bm25", show_progress=False)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--model", f"smol={smollm2_dir}", "--benchmark", f"hotpotqa={bench}", "--index", str(index),
              "--method", "direct", "rag", "--batch-size", "12", "--output-dir", str(out), "--experiment", ""])
    assert done.value.code in (0, None)
    table = {line.split(",")[0]: line.split(",") for line in (out / "table.csv").read_text().splitlines()[1:]}
    for method in ("direct", "rag"):
        preds = [json.loads(line) for line in (out / "predictions" / f"{method}-smol.jsonl").open()]
        assert len(preds) == 12
        f1 = sum(f1_score(p["prediction"], p["answers"]) for p in preds) / 12
        assert float(table[method][3]) == pytest.approx(f1, abs=5e-4) and f1 > 0
        assert all(p["prediction"] == p["response"].strip().split("\n")[0].strip() for p in preds)
    assert "direct smol hotpotqa: 12/12 questions (100%)" in capsys.readouterr().out  # plain progress lines
