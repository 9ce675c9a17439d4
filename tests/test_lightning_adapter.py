"""``stepsearch.lightning_adapter``: one test per private Lightning/torch touch point, each failing when
the installed Lightning or torch changes what the adapter relies on; and a scan of ``src/`` that
fails on private Lightning/torch attribute access anywhere else.

What the scan calls private Lightning/torch access (``_x``: one leading underscore, not a dunder):

A. on any object other than ``self``/``cls`` (``obj._x``, ``getattr(obj, "_x")``, ``hasattr``/
   ``setattr``/``delattr``, ``object.__setattr__(obj, "_x", …)``) and on ``x.__dict__["_x"]``
   (``self`` included), when ``_x`` is a private name of Lightning, torch FSDP or ``torch.nn.Module``
   (defined anywhere in their source as ``def _x`` or ``self._x = …``);
B. inside one of our classes that derives from a Lightning/torch class: ``self._x`` or ``def _x``
   (an override) when ``_x`` is a private name of a Lightning/torch class in its bases (e.g.
   ``self._data_parallel_size`` in a ``ModelParallelStrategy`` subclass).

So our own private names (``self._trainer`` on our callback, ``engine._begin`` on our rollout engine,
``core._KL_ALIASES``) pass, as do other libraries' (argparse); :data:`OWN_NAMES_SHADOWING_LIGHTNING`
lists the few of ours that share a name with a Lightning private one. Mixins without a Lightning base
(``EvaluationHooks``) are read by rule A only.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

from stepsearch import lightning_adapter

SRC = Path(__file__).resolve().parents[1] / "src" / "stepsearch"
ADAPTER = SRC / "lightning_adapter.py"
# Ours, though Lightning has a private name spelt the same: (file under src/stepsearch, name, why).
OWN_NAMES_SHADOWING_LIGHTNING = {
    ("cli.py", "_run"): "the argparse handler each command sets with set_defaults(_run=...)",
}
GETTERS = {"getattr", "hasattr", "setattr", "delattr"}
EXTERNAL = ("lightning", "torch")


# ------------------------------------------------------------------------------------- the scan

def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_names_in_source(text: str) -> set[str]:
    return (set(re.findall(r"\bself\.(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=(?!=)", text))
            | set(re.findall(r"\bdef (_[A-Za-z]\w*)", text)))


def lightning_torch_private_names() -> set[str]:
    import lightning
    import torch.distributed.fsdp as fsdp
    import torch.nn.modules.module as nn_module

    files = [*Path(lightning.__file__).parent.rglob("*.py"), *Path(fsdp.__file__).parent.rglob("*.py"),
             Path(nn_module.__file__)]
    names: set[str] = set()
    for path in files:
        names |= _private_names_in_source(path.read_text(errors="ignore"))
    return names


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _literal_name(node: ast.Call, index: int) -> str | None:
    if len(node.args) > index and isinstance(node.args[index], ast.Constant):
        value = node.args[index].value
        if isinstance(value, str) and _private(value):
            return value
    return None


def _is_self(node: ast.AST) -> bool:
    return ((isinstance(node, ast.Name) and node.id in ("self", "cls"))
            or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"))


def _accesses(tree: ast.Module):
    """(line, name, on self, text) for every private attribute access in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            yield node.lineno, node.attr, _is_self(node.value), ast.unparse(node)
        elif isinstance(node, ast.Call) and _call_name(node) in GETTERS | {"__setattr__", "__getattribute__"}:
            name = _literal_name(node, 1)
            if name:
                yield node.lineno, name, _is_self(node.args[0]), ast.unparse(node)
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
              and node.value.attr == "__dict__" and isinstance(node.slice, ast.Constant)
              and isinstance(node.slice.value, str) and _private(node.slice.value)):
            yield node.lineno, node.slice.value, False, ast.unparse(node)  # another class's storage


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_map(tree: ast.Module) -> dict[str, str]:
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


class _Classes:
    """Our classes by dotted name, and the private names of the Lightning/torch classes they derive from."""

    def __init__(self, trees: dict[Path, ast.Module], root: Path):
        self.defs: dict[str, tuple[ast.ClassDef, dict[str, str], str]] = {}
        for path, tree in trees.items():
            module, imports = _module_name(path, root), _import_map(tree)
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    self.defs[f"{module}.{node.name}"] = (node, imports, module)
        self.cache: dict[str, set[str]] = {}

    def _resolve(self, base: ast.AST, imports: dict[str, str], module: str) -> str | None:
        dotted = _dotted(base)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        full = imports.get(head, f"{module}.{head}")
        return f"{full}.{rest}" if rest else full

    def external_private_names(self, qualified: str) -> set[str]:
        """Private names of the Lightning/torch classes ``qualified`` (ours or theirs) derives from."""
        if qualified in self.cache:
            return self.cache[qualified]
        self.cache[qualified] = names = set()
        if qualified in self.defs:
            node, imports, module = self.defs[qualified]
            for base in node.bases:
                resolved = self._resolve(base, imports, module)
                if resolved:
                    names |= self.external_private_names(resolved)
        elif qualified.startswith(EXTERNAL):
            module_name, _, attr = qualified.rpartition(".")
            cls = getattr(importlib.import_module(module_name), attr, None)
            for klass in getattr(cls, "__mro__", ()):
                if klass.__module__.startswith(EXTERNAL):
                    try:
                        names |= _private_names_in_source(inspect.getsource(klass))
                    except (OSError, TypeError):
                        pass
        return names


def private_access_outside_adapter(trees: dict[Path, ast.Module], external: set[str], root: Path = SRC) -> list[str]:
    """``file:line: expression`` for each private Lightning/torch access (rules A and B above)."""
    classes = _Classes(trees, root)
    found = []
    for path, tree in trees.items():
        if path == root / ADAPTER.name:
            continue
        relative = str(path.relative_to(root))
        for line, name, on_self, text in _accesses(tree):
            if on_self or (relative, name) in OWN_NAMES_SHADOWING_LIGHTNING:
                continue
            if name in external:
                found.append((relative, line, text))
        module = _module_name(path, root)
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            inherited = classes.external_private_names(f"{module}.{node.name}")
            for inner in ast.walk(node):
                if (isinstance(inner, ast.Attribute) and _is_self(inner.value) and _private(inner.attr)
                        and inner.attr in inherited):
                    found.append((relative, inner.lineno, f"{ast.unparse(inner)} (inherited from Lightning/torch)"))
                elif isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)) and inner.name in inherited:
                    found.append((relative, inner.lineno, f"def {inner.name} (overrides Lightning/torch)"))
    return [f"{file}:{line}: {text}" for file, line, text in sorted(set(found))]


def _parse(paths) -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), filename=str(p)) for p in paths}


@pytest.fixture(scope="module")
def external_names():
    return lightning_torch_private_names()


def test_no_private_lightning_or_torch_attribute_outside_the_adapter(external_names):
    found = private_access_outside_adapter(_parse(SRC.rglob("*.py")), external_names)
    assert found == [], ("private Lightning/torch attributes outside stepsearch/lightning_adapter.py (use public API, "
                         "or add a documented, tested function there):\n" + "\n".join(found))


def test_the_scan_sees_each_kind_of_private_access(tmp_path, external_names):
    """Guard against a scan that finds nothing: one file with each kind, one with our own names."""
    bad = tmp_path / "stepsearch" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(textwrap.dedent("""
        from lightning.pytorch.strategies import ModelParallelStrategy

        def f(trainer, logger, callback, module):
            trainer._logger_connector.update_train_step_metrics()
            getattr(logger, "_initialized", False)
            callback._last_checkpoint_saved
            return module.__dict__["_modules"]

        class S(ModelParallelStrategy):
            def setup_environment(self):
                self._data_parallel_size = 2

            def _setup_distributed(self):
                pass
    """))
    good = tmp_path / "stepsearch" / "good.py"
    good.write_text(textwrap.dedent("""
        from lightning.pytorch.callbacks import Callback

        class Mine(Callback):
            def __init__(self):
                self._tally_of_mine = 0

            def _bump(self, other):
                other._tally_of_mine += 1
                return getattr(other, "_tally_of_mine")
    """))
    found = private_access_outside_adapter(_parse([bad, good]), external_names, root=tmp_path / "stepsearch")
    assert [f.split(": ", 1)[1] for f in found] == [
        "trainer._logger_connector", "getattr(logger, '_initialized', False)", "callback._last_checkpoint_saved",
        "module.__dict__['_modules']", "self._data_parallel_size (inherited from Lightning/torch)",
        "def _setup_distributed (overrides Lightning/torch)"], found


# ------------------------------------------------------------------------------------- a tiny fit

class Tiny(L.LightningModule):
    """Manual optimization, ``steps`` optimizer steps per batch, a ``loss`` logged each batch."""

    def __init__(self, steps: int = 1):
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 1)
        self.steps = steps

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        for _ in range(self.steps):
            optimizer.zero_grad()
            self.manual_backward(self.layer(batch).pow(2).mean())
            optimizer.step()
        self.log("loss", float(batch_idx), on_step=True, on_epoch=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.randn(8, 2), batch_size=2)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kwargs})


class Recorder(L.loggers.Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []
        self.in_batch_end = False
        self.during_batch_end: list[int] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))
        if self.in_batch_end:
            self.during_batch_end.append(step)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


# ------------------------------------------------------------------------------------- touch points

def test_flush_train_step_metrics_logs_the_step_before_the_batch_end_hooks_finish(tmp_path):
    recorder = Recorder()

    class Flush(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            recorder.in_batch_end = True
            lightning_adapter.flush_train_step_metrics(trainer)
            recorder.in_batch_end = False

    _trainer(tmp_path, logger=recorder, callbacks=[Flush()], log_every_n_steps=1).fit(Tiny())
    # Logged from inside on_train_batch_end, at the step Lightning's own flush uses (batches done before).
    assert recorder.during_batch_end == [0, 1, 2]
    # Lightning's own flush after the hooks logs the same (metric, step) again (records.runs.LogOnce drops it).
    assert sorted({(step, m["loss"]) for step, m in recorder.logged if "loss" in m}) == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_cluster_environment_is_the_trainer_s_even_on_one_device(tmp_path):
    from lightning.fabric.plugins.environments import ClusterEnvironment, LightningEnvironment

    environment = LightningEnvironment()
    assert lightning_adapter.cluster_environment(_trainer(tmp_path, plugins=[environment])) is environment
    assert isinstance(lightning_adapter.cluster_environment(_trainer(tmp_path)), ClusterEnvironment)


def test_last_checkpoint_saved_names_the_model_checkpoint_s_last_file(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    assert lightning_adapter.last_checkpoint_saved(callback) == (0, "")  # nothing saved yet
    _trainer(tmp_path, callbacks=[callback], enable_checkpointing=True).fit(Tiny())
    step, path = lightning_adapter.last_checkpoint_saved(callback)
    assert step == 3 and Path(path).is_file() and "step=3" in Path(path).name


def test_mark_checkpoint_saved_stops_the_scheduled_save_of_that_step(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)

    class SavedElsewhere(L.Callback):  # runs before ModelCheckpoint (Lightning puts checkpoint callbacks last)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                lightning_adapter.mark_checkpoint_saved(checkpoint, 2)

    _trainer(tmp_path, callbacks=[SavedElsewhere(), checkpoint], enable_checkpointing=True).fit(Tiny())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=3.ckpt"]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_mlflow_logger_store_name_and_started_run(mlflow_uri):
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="adapter", run_name="named", tracking_uri=mlflow_uri)
    assert lightning_adapter.mlflow_tracking_uri(logger) == mlflow_uri
    assert lightning_adapter.mlflow_run_name(logger) == "named"
    assert lightning_adapter.mlflow_run_name(MLFlowLogger(tracking_uri=mlflow_uri)) is None
    assert lightning_adapter.mlflow_run_started(logger) is False
    run_id = logger.run_id  # creates the run
    assert run_id and lightning_adapter.mlflow_run_started(logger) is True


def test_attach_mlflow_run_logs_into_the_existing_run(mlflow_uri):
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.create_experiment("attach")
    run_id = client.create_run(experiment).info.run_id
    logger = MLFlowLogger(experiment_name="attach", tracking_uri=mlflow_uri)
    lightning_adapter.attach_mlflow_run(logger, run_id)
    logger.log_metrics({"m": 1.5}, step=7)
    assert logger.run_id == run_id
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "m")] == [(7, 1.5)]
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]  # no second run
    with pytest.raises(RuntimeError):
        lightning_adapter.attach_mlflow_run(logger, run_id)


def test_set_data_parallel_size_is_what_model_parallel_setup_reads():
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)
    assert strategy._data_parallel_size == "auto"  # the attribute the constructor fills
    lightning_adapter.set_data_parallel_size(strategy, 4)
    assert strategy._data_parallel_size == 4
    # setup_environment resolves "auto" only when still "auto", and builds the mesh from this attribute.
    source = inspect.getsource(ModelParallelStrategy.setup_environment)
    assert 'if self._data_parallel_size == "auto"' in source
    assert "_setup_device_mesh(\n            self._data_parallel_size" in source


FSDP_SCRIPT = """
import tempfile, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from stepsearch import lightning_adapter

dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
mesh = init_device_mesh("cpu", (1,))
for layer in model:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
state = model._get_fsdp_state()
assert not state._is_root, state._is_root
lightning_adapter.fsdp_lazy_init(model)
assert state._is_root is True
assert model[0]._get_fsdp_state()._is_root is False  # the root claimed the layers
for m in [model, *model]:
    m.unshard()
print(model(torch.randn(3, 4)).shape)
dist.destroy_process_group()
"""


def test_fsdp_lazy_init_makes_the_root_claim_its_layers(tmp_path):
    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([3, 2])" in proc.stdout


# ------------------------------------------------------------------------------------- the PPO-iteration count

def test_one_counted_step_per_iteration_keeps_global_step_on_our_counter(tmp_path):
    """The public behaviour ``StepSearchPPO.step_optimizer`` relies on: ``global_step`` counts
    ``LightningOptimizer.step`` calls, not ``strategy.optimizer_step``; checkpoints are named from the
    ``step`` the module logs."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stepsearch.records.runs import CHECKPOINT_NAME
    from stepsearch.training.module import StepSearchPPO

    class Iterations(Tiny):
        step_optimizer = StepSearchPPO.step_optimizer
        _count_one_iteration = StepSearchPPO._count_one_iteration

        def __init__(self):
            super().__init__(steps=3)
            self.ppo_iterations, self._iteration_counted, self.hooked = 0, False, 0

        def on_before_optimizer_step(self, optimizer):
            self.hooked += 1  # the precision plugin's hook path runs for uncounted steps too

        def training_step(self, batch, batch_idx):
            optimizer, iteration = self.optimizers(), self.ppo_iterations
            for _ in range(self.steps):
                optimizer.zero_grad()
                self.manual_backward(self.layer(batch).pow(2).mean())
                self.step_optimizer(optimizer)
            self._count_one_iteration(iteration)

    class Plain(Tiny):
        pass

    plain = _trainer(tmp_path / "plain", max_steps=6)
    plain.fit(Plain(steps=3))
    assert plain.global_step == 6  # Lightning: one global step per optimizer step (2 batches)

    module = Iterations()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                 filename=CHECKPOINT_NAME, auto_insert_metric_name=False)
    trainer = _trainer(tmp_path / "ours", callbacks=[checkpoint], enable_checkpointing=True)
    weights = module.layer.weight.detach().clone()
    trainer.fit(module)
    assert trainer.global_step == module.ppo_iterations == 3 and module.hooked == 9
    assert not torch.equal(weights, module.layer.weight)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "iter-000001.ckpt", "iter-000002.ckpt", "iter-000003.ckpt"]
