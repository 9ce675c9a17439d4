"""``StepSearchDataModule``: QA examples in, prompt batches out, and the environment that turns them
into rollouts (retriever, prompt template, rollout engine).

Train/val/test come from any file :func:`~stepsearch.data.sources.read_examples` reads (one path
or a list, concatenated), or from a generated world (``world:``): ``prepare_data`` writes it into
``world_dir`` once (idempotent), the splits default to its files and the retriever to BM25 over its
corpus (index ``{world_dir}/index_bm25``, built on first use when missing).

Batches are plain ``list[Example]`` (:func:`collate_examples`): the rollout engine formats
prompts itself. The train loader serves global batches of ``batch_size`` prompts drawn from a
per-epoch seeded order, each rank its strided share, the last batch filled up from the epoch's start
(:class:`~stepsearch.data.sampling.GlobalBatchSampler`: the prompts of an iteration do not depend on
the number of ranks); validation and test loaders never shuffle and never drop the last batch. ``val_fraction`` holds out a seeded random
part of train as validation. The retriever is built lazily, once per process, on first use of
:attr:`StepSearchDataModule.retriever` (so a JVM never crosses a process boundary); when it must
build an index, ``prepare_data`` does it on the rank that prepares data.

Rollouts (METHOD.md §1): the LightningModule hands its live policy over once per process
(:meth:`StepSearchDataModule.attach_policy`, in its ``setup``); the DataModule then owns the engine
``rollout.backend`` names (Hugging Face or vLLM, :func:`stepsearch.rollout.factory.build_engine`)
over its retriever, and serves rollout batches through :meth:`~StepSearchDataModule.rollout` (and the
engine itself as :attr:`~StepSearchDataModule.rollouts`). Never stale: loaders yield questions only,
and a rollout is generated when the module asks for it inside ``training_step``, after the previous
PPO update and the engine's weight sync (:meth:`~StepSearchDataModule.policy_updated`). Lightning's
one-batch prefetch therefore prefetches questions, never trajectories.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from stepsearch.data.schema import Example
from stepsearch.data.synthetic import WorldConfig, world_paths, write_world
from stepsearch.errors import StepSearchError
from stepsearch.retrieval.factory import RetrieverConfig, build_retriever
from stepsearch.data.continuation import ResumableDataLoader
from stepsearch.data.sources import load_examples
from stepsearch.rollout.factory import build_engine
from stepsearch.data.sampling import GlobalBatchSampler

Files = str | list[str] | None


class ExampleDataset(Dataset):
    """A list of examples as a map-style dataset."""

    def __init__(self, examples: list[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def collate_examples(batch: list[Example]) -> list[Example]:
    """Batches stay lists of examples (top-level, so worker processes can pickle it)."""
    return list(batch)


def _as_list(files: Files) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, (str, Path)) else [str(f) for f in files]


class StepSearchDataModule(pl.LightningDataModule):
    """QA examples for StepSearch training and evaluation, and the retriever that serves them.

    Args:
        train: training file(s) (any format ``read_examples`` reads) or hub dataset name(s).
        val: validation file(s); ``None`` with ``val_fraction > 0`` holds out part of train.
        test: test file(s).
        format: force one input format for all files (default: detected per file).
        retriever: the search engine (BM25 / dense / HTTP); with ``world`` set, defaults to BM25
            over the world corpus, and an unset ``corpus``/``index`` is filled from the world.
        world: generate a synthetic world (corpus + splits) into ``world_dir`` and use it for any
            split, and the corpus, not given explicitly.
        world_dir: where the world is written (and its BM25 index, ``index_bm25``).
        batch_size: prompts per training batch (PPO iteration), over all ranks.
        val_batch_size: prompts per validation/test batch.
        val_fraction: fraction of train held out as validation (seeded); exclusive with ``val``.
        max_train_examples: keep at most this many training examples (after the split).
        max_val_examples: keep at most this many validation examples.
        max_test_examples: keep at most this many test examples.
        seed: seeds the validation split and the train shuffling.
        num_workers: DataLoader worker processes.
        strict: fail on the first malformed row instead of skipping it.
    """

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        format: str | None = None,
        retriever: RetrieverConfig | None = None,
        world: WorldConfig | None = None,
        world_dir: str = "data/world",
        batch_size: int = 8,
        val_batch_size: int = 16,
        val_fraction: float = 0.0,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        max_test_examples: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        strict: bool = False,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise StepSearchError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction > 0 and val is not None:
            raise StepSearchError("set either val (a file) or val_fraction (a split of train), not both")
        if batch_size < 1 or val_batch_size < 1:
            raise StepSearchError("batch_size and val_batch_size must be >= 1")
        self.train_files, self.val_files, self.test_files = _as_list(train), _as_list(val), _as_list(test)
        self.format = format
        self.retriever_config = retriever
        self.world = world
        self.world_dir = Path(world_dir)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.val_fraction = val_fraction
        self.max_train_examples, self.max_val_examples, self.max_test_examples = max_train_examples, max_val_examples, max_test_examples
        self.seed, self.num_workers, self.strict = seed, num_workers, strict
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.test_examples: list[Example] = []
        self._retriever = None
        self._engine = None
        self._engine_key: tuple | None = None
        self._loaded: set[str] = set()

    # ------------------------------------------------------------------ world and files

    def _world_paths(self) -> dict[str, Path]:
        return world_paths(self.world_dir)

    def split_files(self, split: str) -> list[str]:
        """The files a split reads: the explicit ones, else the world's (val: unless val_fraction)."""
        explicit = {"train": self.train_files, "val": self.val_files, "test": self.test_files}[split]
        if explicit or self.world is None or (split == "val" and self.val_fraction > 0):
            return explicit
        return [str(self._world_paths()[split])]

    def resolved_retriever_config(self) -> RetrieverConfig | None:
        """The retriever config with world defaults filled in (``None`` when nothing is configured)."""
        config = self.retriever_config
        if self.world is None:
            return config
        if config is None:
            config = RetrieverConfig(kind="bm25")
        updates = {}
        if getattr(config, "corpus", None) is None and config.kind != "http":
            updates["corpus"] = str(self._world_paths()["corpus"])
        if getattr(config, "index", None) is None and config.kind == "bm25":
            updates["index"] = str(self.world_dir / "index_bm25")
        return dataclasses.replace(config, **updates) if updates else config

    def prepare_data(self) -> None:
        """Write the world (once), and build the retriever's index when it is missing."""
        if self.world is not None:
            write_world(self.world, self.world_dir)
        config = self.resolved_retriever_config()
        index = getattr(config, "index", None) if config is not None else None
        if config is not None and getattr(config, "corpus", None) and index and not Path(index).exists():
            _ = self.retriever  # builds the index (and keeps the retriever for this process)

    # ------------------------------------------------------------------ examples

    def _read(self, files: list[str], limit: int | None) -> list[Example]:
        examples: list[Example] = []
        for path in files:
            if limit is not None and len(examples) >= limit:
                break  # the cap is met: later files need not be read
            remaining = None if limit is None else limit - len(examples)
            examples += load_examples(path, format=self.format, strict=self.strict, limit=remaining)
        return examples

    def setup(self, stage: str | None = None) -> None:
        """Read the splits the stage needs (each once)."""
        need = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(stage or "", ("train", "val", "test"))
        if "train" in need or ("val" in need and self.val_fraction > 0):
            self._setup_train_val()
        if "val" in need and "val" not in self._loaded:
            self.val_examples = self._read(self.split_files("val"), self.max_val_examples)
            self._loaded.add("val")
        if "test" in need and "test" not in self._loaded:
            self.test_examples = self._read(self.split_files("test"), self.max_test_examples)
            self._loaded.add("test")

    def _setup_train_val(self) -> None:
        if "train" in self._loaded:
            return
        train = self._read(self.split_files("train"), None)
        if self.val_fraction > 0:
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, round(len(train) * self.val_fraction)) if train else 0
            held = set(order[:n_val])
            self.val_examples = [ex for i, ex in enumerate(train) if i in held][: self.max_val_examples]
            train = [ex for i, ex in enumerate(train) if i not in held]
            self._loaded.add("val")
        self.train_examples = train[: self.max_train_examples] if self.max_train_examples is not None else train
        self._loaded.add("train")

    # ------------------------------------------------------------------ loaders

    def _loader(self, examples: list[Example], batch_size: int, train: bool, split: str) -> DataLoader | list:
        if not examples and split == "val" and not self.split_files("val") and self.val_fraction == 0:
            return []  # no validation configured: Lightning skips validation
        if not examples:
            files = self.split_files(split)
            raise StepSearchError(
                f"no {split} examples: " + (f"{', '.join(files)} gave none" if files else f"set data.{split}" + (" or data.world" if split != "val" else ", data.val_fraction or data.world"))
            )
        sampler = None
        if train:  # global batches, each rank its strided share, seeded per epoch (data.sampling)

            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            sampler = GlobalBatchSampler(len(examples), self.batch_size, rank=rank, world_size=world, seed=self.seed)

        return (ResumableDataLoader if train else DataLoader)(
            ExampleDataset(examples),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=False,
            collate_fn=collate_examples,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self._setup_train_val()
        return self._loader(self.train_examples, self.per_rank_batch_size(), True, "train")

    def per_rank_batch_size(self) -> int:
        """``batch_size`` is global (prompts per PPO iteration over all ranks): each rank loads its share."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise StepSearchError(f"data.batch_size={self.batch_size} must be divisible by the number of ranks ({world}): "
                                  "batch sizes are global (all ranks)")
        return self.batch_size // world

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return self._loader(self.val_examples, self.val_batch_size, False, "val")

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_examples, self.val_batch_size, False, "test")

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # ------------------------------------------------------------------ retriever

    @property
    def retriever(self):
        """The configured retriever, built on first access in this process."""
        if self._retriever is None:
            config = self.resolved_retriever_config()
            if config is None:
                raise StepSearchError("no retriever configured: set data.retriever (or data.world for the synthetic world's BM25)")

            self._retriever = build_retriever(config)
        return self._retriever

    # ------------------------------------------------------------------ rollouts

    def attach_policy(self, model, tokenizer, rollout, model_path: str | None = None) -> None:
        """Build this process's rollout engine (``rollout.backend``) around the live policy ``model``.
        Idempotent for the same policy and settings (a validate/test after fit keeps the engine)."""
        key = (id(model), repr(rollout), model_path)
        if self._engine is not None and self._engine_key == key:
            return

        self._engine = build_engine(rollout, model, tokenizer, self.retriever, model_path=model_path)
        self._engine_key = key

    @property
    def rollouts(self):
        """The rollout engine (``generate(questions, greedy=, seed=) -> Trajectory``)."""
        if self._engine is None:
            raise StepSearchError("no rollout engine yet: the LightningModule attaches its policy in setup "
                                  "(StepSearchDataModule.attach_policy)")
        return self._engine

    def rollout(self, examples: list[Example], *, greedy: bool = False, seed: int | None = None,
                row_keys: list | None = None):
        """A rollout batch (``Trajectory``) of ``examples``, generated now with the current policy; row
        ``i`` samples from a seed derived from ``seed`` and ``row_keys[i]`` (stepsearch.rollout.seeding)."""
        return self.rollouts.generate([ex.question for ex in examples], greedy=greedy, seed=seed, row_keys=row_keys)

    def policy_updated(self) -> None:
        """The policy changed (a PPO update): the engine re-syncs before its next rollout."""
        if self._engine is not None:
            self._engine.policy_updated()

    def __getstate__(self) -> dict:
        # A retriever may hold a JVM or sockets, an engine a model: never pickle them (rebuilt lazily).
        state = dict(self.__dict__)
        state["_retriever"], state["_engine"], state["_engine_key"] = None, None, None
        return state
