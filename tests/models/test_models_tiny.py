"""The tiny offline model and the policy loader."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch

from stepsearch.errors import DataError, StepSearchError
from stepsearch.models.loading import load_policy, load_tokenizer, resolve_dtype
from stepsearch.models.tiny import iter_corpus_texts, make_tiny_model
from stepsearch.rollout.template import TAGS, format_prompt


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, corpus_path: Path) -> Path:
    path = tmp_path_factory.mktemp("tiny_corpus") / "slice.jsonl"
    with corpus_path.open(encoding="utf-8") as src:
        path.write_text("".join(islice(src, 250)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_questions") / "train.jsonl"
    rows = [{"id": str(i), "question": f"Who was the drummer of band number {i}?", "answer": "x"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, corpus_file, questions_file) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", [str(corpus_file), str(questions_file)],
                           vocab_size=1024, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64, seed=7)


def test_loads_back_through_from_pretrained(tiny_dir: Path):
    model, tokenizer = load_policy(tiny_dir, device="cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (32, 2, 4, 2, 64)
    assert config.vocab_size == len(tokenizer) == 1024 + len(TAGS)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.float32


def test_tags_are_single_ids_decoded_as_text(tiny_dir: Path):
    tokenizer = load_tokenizer(tiny_dir)
    for tag in TAGS:
        ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=True) == tag
    text = "<think> a </think><search> Jeff Porcaro </search>\n\n<information> Doc 1 </information>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text


def test_bpe_learned_the_corpus(tiny_dir: Path, corpus_file: Path):
    tokenizer = load_tokenizer(tiny_dir)
    texts = list(islice(iter_corpus_texts(corpus_file), 50))
    chars = sum(len(t) for t in texts)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert chars / tokens > 2.0  # merges, not bytes
    # Round trip is exact.
    for text in texts[:10]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
    # Frequent words are single tokens; a name is split into shared sub-word pieces.
    assert len(tokenizer(" the", add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer(" Porcaro", add_special_tokens=False)["input_ids"]) > 1


def test_same_seed_same_weights(tmp_path: Path, corpus_file: Path, tiny_dir: Path):
    again = make_tiny_model(tmp_path / "again", [str(corpus_file)], vocab_size=1024, hidden_size=32,
                            num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, seed=7,
                            extra_texts=[])
    a, _ = load_policy(tiny_dir, device="cpu")
    b, _ = load_policy(again, device="cpu")
    # (the question file changes the vocabulary, so compare a layer whose shape does not depend on it)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    other = make_tiny_model(tmp_path / "other", [str(corpus_file)], vocab_size=1024, hidden_size=32,
                            num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, seed=8)
    c, _ = load_policy(other, device="cpu")
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_dtype_and_gradient_checkpointing(tiny_dir: Path):
    model, _ = load_policy(tiny_dir, dtype="bf16", device="cpu", gradient_checkpointing=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert resolve_dtype("float16") == torch.float16 and resolve_dtype("auto") == "auto"
    with pytest.raises(StepSearchError, match="unknown dtype"):
        resolve_dtype("float8")


def test_missing_pad_token_becomes_eos(tiny_dir: Path, tmp_path: Path):
    tokenizer = load_tokenizer(tiny_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token == reloaded.eos_token


def test_offline_hub_name_is_a_clear_error(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(StepSearchError, match="HF_HUB_OFFLINE is set"):
        load_policy("stepsearch-test/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepSearchError, match="not a model directory"):
        load_tokenizer(tmp_path / "empty")


def test_chat_template_option(tmp_path: Path, corpus_file: Path):
    out = make_tiny_model(tmp_path / "chat", [str(corpus_file)], vocab_size=512, hidden_size=16, num_layers=1,
                          num_heads=2, num_kv_heads=1, intermediate_size=32, chat_template=True)
    tokenizer = load_tokenizer(out)
    prompt = format_prompt("Who?", tokenizer)
    assert prompt.startswith("<|im_start|>user\nAnswer the given question.")
    assert prompt.endswith("Question: Who?\n<|im_end|>\n<|im_start|>assistant\n")
    assert len(tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"]) == 1


def test_corpus_readers(tmp_path: Path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"contents": "\\"T\\"\\nbody"}\n\n{"question": "q?", "answer": "no"}\n{"other": 1}\n')
    assert list(iter_corpus_texts(jsonl)) == ['"T"\nbody', "q?"]
    plain = tmp_path / "b.txt"
    plain.write_text("line one\n\nline two\n")
    assert list(iter_corpus_texts(plain)) == ["line one", "line two"]
    array = tmp_path / "c.json"
    array.write_text('[{"text": "t1"}, {"question": "q2"}]')
    assert list(iter_corpus_texts(array)) == ["t1", "q2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"contents": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_corpus_texts(bad))
    with pytest.raises(DataError, match="not found"):
        list(iter_corpus_texts(tmp_path / "missing.jsonl"))


def test_cli_model_tiny(tmp_path: Path, corpus_file: Path, capsys):
    from stepsearch.cli import main

    out = tmp_path / "cli_model"
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "tiny", "--out", str(out), "--corpus", str(corpus_file), "--vocab-size", "512",
              "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1",
              "--intermediate-size", "32"])
    assert exit_info.value.code == 0
    model, tokenizer = load_policy(out, device="cpu")
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 1
    assert "parameters" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "tiny", "--out", str(tmp_path / "bad"), "--hidden-size", "30", "--num-heads", "4"])
    assert exit_info.value.code == 2
    assert "divisible" in capsys.readouterr().err
