"""Real pretrained parts (stepsearch.models.pretrained): the Qwen2.5 tokenizer rebuilt from its BPE
ranks, the Qwen2.5-shaped model folder, SmolLM2-135M-Instruct converted from its GGUF, and the
refusal of a .gguf path where a Hugging Face folder is expected."""

from __future__ import annotations

import json

import pytest

from stepsearch.errors import StepSearchError


def test_qwen25_tokenizer_has_qwen25s_ids(qwen25_tokenizer):
    from stepsearch.models.pretrained import QWEN25_SPECIAL_TOKENS

    tok = qwen25_tokenizer
    assert len(tok) == 151665
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tok.convert_tokens_to_ids(list(QWEN25_SPECIAL_TOKENS)) == list(range(151643, 151665))
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token) == ("<|im_end|>", 151645, 151643, None)
    # Tags are several tokens, and a tag's '>' merges with the newlines after it.
    assert tok("</search>\n\n<information>", add_special_tokens=False)["input_ids"] == [522, 1836, 1339, 27, 25069, 29]
    assert tok("<think>", add_special_tokens=False)["input_ids"] == [13708, 766, 29]
    # <tool_call> is one added token, kept by decode(skip_special_tokens=True) (not special in Qwen2.5).
    assert tok.decode(tok("a<tool_call>b<|im_end|>")["input_ids"], skip_special_tokens=True) == "a<tool_call>b"


def test_qwen25_chat_template_and_default_system_prompt(qwen25_tokenizer):
    text = qwen25_tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                                add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    own = qwen25_tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
                                               tokenize=False)
    assert own == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"


def test_qwen25_shaped_folders(qwen25_dir, qwen25_base_dir):
    from stepsearch.models.loading import load_policy

    model, tok = load_policy(qwen25_dir, device="cpu")
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert config.vocab_size == model.get_input_embeddings().weight.shape[0] == 151936 == len(tok) + 271
    assert config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert config.hidden_size // config.num_attention_heads == 64 and config.num_key_value_heads < config.num_attention_heads
    assert model.generation_config.eos_token_id == [151645, 151643]
    base = json.loads((qwen25_base_dir / "tokenizer_config.json").read_text())
    assert base["eos_token"] == "<|endoftext|>" and not (qwen25_base_dir / "chat_template.jinja").exists()
    assert "chat_template" not in base


def test_smollm2_folder_is_a_plain_llama(smollm2_dir):
    from stepsearch.models.loading import load_policy

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    model, tok = load_policy(smollm2_dir, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tok) == model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")


def test_a_gguf_path_is_refused_with_the_convert_command(tmp_path):
    from stepsearch.models.loading import load_policy
    from stepsearch.models.pretrained import convert_gguf

    fake = tmp_path / "model.Q4_0.gguf"
    fake.write_bytes(b"not gguf")
    with pytest.raises(StepSearchError, match=r"model convert --gguf .*model\.Q4_0\.gguf"):
        load_policy(fake)
    with pytest.raises(StepSearchError, match=r"model\.Q4_0\.gguf: not a GGUF file"):
        convert_gguf(fake, tmp_path / "out")
    with pytest.raises(StepSearchError, match="GGUF file not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
