"""The Hugging Face rollout engine with real tokenizers (issue 17): the Qwen2.5 tokenizer, in which a
tag is several tokens and its closing ``>`` merges with what follows (``</search>\\n\\n`` is
``</`` ``search`` ``>\\n\\n``), and SmolLM2's; Qwen2.5's chat template and default system prompt; and
the 271 padding rows of a Qwen2.5-sized output layer, which must never be sampled."""

from __future__ import annotations

import pytest
import torch

from stepsearch.rollout import template as tpl
from stepsearch.rollout.decoding import StopRule

PREFIX = {"</search>": "<think> Who directed it? </think>\n<search> Jaws director", "</answer>": "<answer> Paris"}
# What may follow a tag in the same token or the next: newlines, spaces, punctuation, another tag.
SUFFIXES = ["", "\n", "\n\n", "\n\n\n", " ", ".", ">\n", "\n\n<information>", "<|im_end|>", "\n\nThe", ")."]


def first_stop(rule: StopRule, ids: list[int]) -> int | None:
    """Index of the token at which ``rule`` stops when ``ids`` are generated one at a time."""
    rule.to("cpu")
    for i in range(len(ids)):
        if rule.classify(torch.tensor([ids[i]]), [ids[: i + 1]])[0] == "tag":
            return i
    return None


@pytest.mark.parametrize("which", ["qwen", "smollm2"])
def test_every_stop_tag_is_found_whatever_merges_follow(which, request):
    from stepsearch.models.loading import load_tokenizer

    tokenizer = request.getfixturevalue("qwen25_tokenizer") if which == "qwen" else \
        load_tokenizer(request.getfixturevalue("smollm2_dir"))
    rule = StopRule(tokenizer, [tokenizer.eos_token_id], len(tokenizer))
    assert rule.tag_ids == [] and sorted(rule.text_tags) == sorted(tpl.STOP_TAGS)  # tags are several tokens
    merged = 0
    for tag in tpl.STOP_TAGS:
        tag_ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        for suffix in SUFFIXES:
            ids = tokenizer(f"{PREFIX[tag]} {tag}{suffix}", add_special_tokens=False)["input_ids"]
            expected = next(i for i in range(len(ids)) if tag in tokenizer.decode(ids[: i + 1]))
            assert first_stop(rule, ids) == expected, (tag, suffix, tokenizer.convert_ids_to_tokens(ids))
            windows = [ids[i:i + len(tag_ids)] for i in range(len(ids))]
            merged += tag_ids not in windows  # the tag's own ids never appear: its '>' merged
    # Qwen merges '>' with newlines and punctuation; SmolLM2 keeps '>' a token of its own.
    assert merged >= (10 if which == "qwen" else 0)


QWEN_SCRIPTS = {
    # Each turn continues past its tag: the engine must cut it right after the token completing it.
    "Who directed Jaws": [
        "<think> I should look it up. </think>\n<search> Jaws film director </search>\n\nThe search will tell.",
        "<think> Spielberg directed it. </think>\n<answer> Steven Spielberg </answer>\n\nDone.",
    ],
    "Where is the Eiffel Tower": [
        "<search> Eiffel Tower location </search>.\n",
        "<answer> Paris </answer>",
    ],
    "What is 2+2": ["<think> easy </think>\n\n<answer> 4 </answer>\n"],
}


def test_qwen_rollout_cuts_turns_after_merged_tags_and_masks_the_environment(qwen25_tokenizer, bm25):
    from stepsearch.rollout.engine import RolloutConfig
    from stepsearch.rollout.hf_engine import HFRolloutEngine
    from stepsearch.rollout.scripted import ScriptedPolicy

    tok = qwen25_tokenizer
    policy = ScriptedPolicy(tok, QWEN_SCRIPTS, eos_after_last=False)
    config = RolloutConfig(max_turns=3, max_response_tokens=48, max_observation_tokens=120, max_context_tokens=4096,
                           top_k=2)
    traj = HFRolloutEngine(policy, tok, bm25, config).generate(list(QWEN_SCRIPTS), greedy=True)
    merged_turns = 0
    for b, (question, turns) in enumerate(QWEN_SCRIPTS.items()):
        record = traj.records[b]
        start, end = int(traj.prompt_lengths[b]), int(traj.attention_mask[b].sum())
        ids, mask = traj.input_ids[b, start:end].tolist(), traj.loss_mask[b, start:end].tolist()
        pieces, current = [], [ids[0]]  # runs of equal mask: policy turns and environment text
        for i in range(1, len(ids)):
            if mask[i] != mask[i - 1]:
                pieces.append((mask[i - 1], current))
                current = []
            current.append(ids[i])
        pieces.append((mask[-1], current))
        policy_texts = [tok.decode(p) for m, p in pieces if m == 1]
        expected = []
        for turn in turns:  # the turn's text up to the end of the token that completes its tag
            turn_ids = tok(turn, add_special_tokens=False)["input_ids"]
            cut = next(i for i in range(len(turn_ids))
                       if any(t in tok.decode(turn_ids[: i + 1]) for t in tpl.STOP_TAGS))
            expected.append(tok.decode(turn_ids[: cut + 1]))
        assert policy_texts == expected  # e.g. "... </search>\n\n": the merged newlines are the policy's
        merged_turns += sum(not text.endswith(">") for text in expected)  # the tag's '>' merged with more
        env_texts = [tok.decode(p) for m, p in pieces if m == 0]
        assert len(env_texts) == len(turns) - 1 and all(t.lstrip().startswith("<information>") for t in env_texts)
        assert tok.decode(ids) == "".join(tok.decode(p) for _, p in pieces) == record.response_text
        assert [s.query for s in record.steps] == [t.split("<search>")[1].split("</search>")[0].strip()
                                                   for t in turns if "<search>" in t]
        assert record.answer == turns[-1].split("<answer>")[1].split("</answer>")[0].strip()
        assert record.finished and record.invalid_actions == ([] if record.steps else ["answer_without_search"])
        for step in record.steps:  # the step's last token is the policy token completing </search>
            end = step.end_index - start  # an index into the whole row
            assert mask[end] == 1 and tok.decode(ids[: end + 1]).count("</search>") == \
                tok.decode(ids[:end]).count("</search>") + 1
    assert merged_turns >= 3


def prompt_text(tokenizer, folder_or_model, **config):
    from stepsearch.rollout.engine import RolloutConfig
    from stepsearch.rollout.hf_engine import HFRolloutEngine

    model = folder_or_model
    engine = HFRolloutEngine(model, tokenizer, retriever=None, config=RolloutConfig(max_turns=0, max_response_tokens=2,
                                                                                 temperature=0, **config))
    traj = engine.generate(["Who wrote Hamlet"], greedy=True)
    ids = traj.input_ids[0, : int(traj.prompt_lengths[0])].tolist()
    return ids, tokenizer.decode(ids)


def test_chat_template_and_system_prompt_for_instruct_models_only(qwen25_dir, qwen25_base_dir, smollm2_dir):
    from stepsearch.models.loading import load_policy

    instruction = tpl.THINK_PROMPT.format(question="Who wrote Hamlet?")
    model, tok = load_policy(qwen25_dir, device="cpu")
    ids, text = prompt_text(tok, model)
    assert text == (f"<|im_start|>system\n{'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'}"
                    f"<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == 151644 and ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n
    assert prompt_text(tok, model, use_chat_template=False)[1] == instruction  # configured off: raw text
    base_model, base_tok = load_policy(qwen25_base_dir, device="cpu")
    base_ids, base_text = prompt_text(base_tok, base_model)
    assert base_text == instruction and 151644 not in base_ids
    smol, smol_tok = load_policy(smollm2_dir, device="cpu")
    smol_text = prompt_text(smol_tok, smol)[1]
    assert smol_text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                                "Face<|im_end|>\n<|im_start|>user\n" + instruction)


PADDING_QUESTIONS = ["Who wrote Hamlet", "Where is Paris", "What is the capital of Peru"]


def boost_padding_rows(model, tokenizer, questions=PADDING_QUESTIONS, scale: float = 40.0) -> None:
    """Make the padding rows the most likely ids after the prompts: each gets the direction of the
    mean final hidden state at the prompts' last positions (tied embeddings: the output rows), scaled."""
    with torch.no_grad():
        batch = tokenizer([tpl.format_prompt(q, tokenizer) for q in questions], return_tensors="pt", padding=True,
                          padding_side="left")
        last = model.model(**batch).last_hidden_state[:, -1].mean(0)
        model.get_output_embeddings().weight[len(tokenizer):] = scale * last / last.norm()


@pytest.fixture()
def qwen_padding_boosted(qwen25_dir):
    from stepsearch.models.loading import load_policy

    model, tok = load_policy(qwen25_dir, device="cpu")
    boost_padding_rows(model, tok)
    return model, tok


def test_padding_rows_are_never_sampled_by_the_hf_engine(qwen_padding_boosted):
    from stepsearch.rollout.engine import RolloutConfig
    from stepsearch.rollout.hf_engine import HFRolloutEngine

    model, tok = qwen_padding_boosted
    questions = PADDING_QUESTIONS
    with torch.no_grad():  # unmasked, the model would pick a padding row right away
        logits = model(**tok([tpl.format_prompt(q, tok) for q in questions], return_tensors="pt",
                             padding=True, padding_side="left")).logits[:, -1]
    assert bool((logits.argmax(-1) >= len(tok)).all())
    for greedy in (True, False):
        config = RolloutConfig(max_turns=0, max_response_tokens=12, top_p=1.0)
        traj = HFRolloutEngine(model, tok, retriever=None, config=config).generate(questions, greedy=greedy, seed=1)
        policy_ids = traj.input_ids[traj.loss_mask.bool()]
        assert len(policy_ids) >= len(questions) * 4
        assert int(policy_ids.max()) < len(tok) == 151665
