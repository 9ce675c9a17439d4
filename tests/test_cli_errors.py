"""Command-line mistakes are one ``error:`` line with a "did you mean" (stepsearch.commands.argument_errors),
not a page of usage: a config path with a typo (failing before torch is imported), a misspelled flag
of ``fit`` or of a tool command, a misspelled subcommand; ``evaluate --format``; ``ask`` without an index."""

from __future__ import annotations

import json
import subprocess

import pytest
from cli_runs import error_lines, run_in_process
from training_fixtures import PYTHON, REPO, python_env

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def _one_error_line(code, text: str, expected: str) -> None:
    assert code == 2, text[-2000:]
    assert error_lines(text) == [f"error: {expected}"], text[-2000:]
    assert "usage:" not in text and "Traceback" not in text, text[-2000:]


def test_a_config_path_typo_fails_before_torch_is_imported(tmp_path):
    """The issue's case: ``fit --config configs/quickstart.yml`` took 19 s and 73 lines of usage."""
    script = ("import sys\nfrom stepsearch.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as done:\n"
              "    print('exit', done.code, 'torch' in sys.modules, 'lightning' in sys.modules)\n")
    proc = subprocess.run([PYTHON, "-c", script, "fit", "--config", "configs/quickstart.yml", "--trainer.max_steps", "5"],
                          cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "exit 2 False False", proc.stdout + proc.stderr
    assert proc.stderr.strip() == ("error: --config configs/quickstart.yml: no such file "
                                   "(did you mean configs/quickstart.yaml?)")


def test_config_file_that_is_not_text(tmp_path, capsys, monkeypatch):
    binary = tmp_path / "model.ckpt"
    binary.write_bytes(b"PK\x03\x04\x00\x00\xff\xfe" * 64)
    code, text = run_in_process(["fit", f"--config={binary}"], capsys, monkeypatch)
    _one_error_line(code, text, f"--config {binary}: not a text file (a YAML or JSON config is expected)")
    code, text = run_in_process(["validate", "-c", str(tmp_path)], capsys, monkeypatch)
    _one_error_line(code, text, f"-c {tmp_path}: is a directory, not a config file")


def test_misspelled_fit_flags_name_the_right_one(capsys, monkeypatch):
    code, text = run_in_process(["fit", "--config", QUICKSTART, "--trainer.max_step", "5"], capsys, monkeypatch)
    _one_error_line(code, text, "unknown option --trainer.max_step (did you mean --trainer.max_steps?) "
                                "(`fit --help` lists them; flags are never abbreviated)")
    code, text = run_in_process(["fit", "--config", QUICKSTART, "--model.ppo.mini_batch", "8"], capsys, monkeypatch)
    _one_error_line(code, text, "unknown option --model.ppo.mini_batch: model.ppo has no field 'mini_batch' "
                                "(did you mean --model.ppo.mini_batch_size?)")
    code, text = run_in_process(["fit", "--config", QUICKSTART, "--trainer.max_steps", "five"], capsys, monkeypatch)
    _one_error_line(code, text, "Parser key \"trainer.max_steps\": Expected a <class 'int'>. Got value: five")


def test_misspelled_tool_flags_and_subcommands(capsys, monkeypatch):
    code, text = run_in_process(["evaluate", "--sute", "suite.yaml"], capsys, monkeypatch)
    _one_error_line(code, text, "python -m stepsearch evaluate: unknown option --sute (did you mean --suite?) "
                                "(`python -m stepsearch evaluate --help` for usage)")
    code, text = run_in_process(["evalute", "--suite", "suite.yaml"], capsys, monkeypatch)
    assert code == 2 and len(error_lines(text)) == 1 and "usage:" not in text, text
    assert error_lines(text)[0].startswith("error: python -m stepsearch: argument COMMAND: invalid choice: 'evalute'")
    assert "(did you mean evaluate?)" in text


def test_evaluate_format_reads_a_layout_that_is_not_detected(tmp_path, capsys, monkeypatch):
    """``evaluate`` said "Pass format= (--from/--format)" but rejected ``--format``."""
    from stepsearch.commands import evaluate
    from stepsearch.errors import StepSearchError

    bench = tmp_path / "plain.jsonl"  # id/question/answer: no layout is detected from these fields
    bench.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Who made thing {i}?", "answer": f"Maker {i}"})
                             + "\n" for i in range(3)))
    with pytest.raises(StepSearchError, match="cannot tell the format .*--format"):
        evaluate.read_benchmark("plain", str(bench))
    seen = {}
    monkeypatch.setattr(evaluate, "run_suite", lambda suite: seen.setdefault("suite", suite))
    code, text = run_in_process(["evaluate", "--benchmark", f"plain={bench}", "--format", "stepsearch_release",
                                 "--model", "some-model", "--index", str(tmp_path)], capsys, monkeypatch)
    assert code == 0, text
    spec = seen["suite"].benchmarks["plain"]
    assert spec == {"format": "stepsearch_release", "path": str(bench)}
    examples, skipped = evaluate.read_benchmark("plain", spec)
    assert [ex.answers for ex in examples] == [["Maker 0"], ["Maker 1"], ["Maker 2"]] and skipped == 0
    code, text = run_in_process(["evaluate", "--benchmark", str(bench), "--format", "csv"], capsys, monkeypatch)
    assert code == 2 and "argument --format: invalid choice: 'csv'" in text, text


def test_ask_without_an_index_says_so(capsys, monkeypatch):
    code, text = run_in_process(["ask", "Who founded Kelvarn Institute?", "--model", "runs/none/policy"],
                                capsys, monkeypatch)
    _one_error_line(code, text, "ask needs --index DIR (a BM25 or dense index) or --url http://host:port "
                                "(a retrieval service)")
