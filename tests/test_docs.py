"""The README is a front door and the docs site builds strictly.

- ``mkdocs build --strict`` (``mkdocs.yml``: links, anchors and nav entries validated as warnings,
  which strict mode turns into failures): a broken link or anchor, an image outside ``docs/``, a nav
  entry without its page, or a page left out of the nav fails here, so it fails CI.
- README.md: at most 220 lines; its first fenced code block holds exactly the setup and test
  commands that ``.ci/run`` runs; every relative link in it resolves to a file in the repository.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 220
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def ci_commands() -> list[str]:
    """The command lines of .ci/run (not comments, not the shell preamble)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    skip = ("#", "set ", "cd ")
    commands = [line.strip() for line in lines if line.strip() and not line.strip().startswith(skip)]
    assert commands, ".ci/run runs no command"
    return commands


def first_code_block(text: str) -> list[str]:
    match = re.search(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    assert match, "README.md has no fenced code block"
    return match.group(1).splitlines()


def strip_comment(line: str) -> str:
    """`command   # setup` -> `command` (a trailing shell comment after whitespace)."""
    return re.sub(r"\s+#[^\"']*$", "", line).strip()


def test_mkdocs_builds_strictly(tmp_path):
    # mkdocs is in the `test` extra; without it the build fails here (not skipped) so CI cannot pass silently
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    problems = [line for line in result.stderr.splitlines() if not line.startswith("INFO")]
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or [result.stderr[-3000:]])
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_a_front_door():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_readme_first_code_block_is_the_ci_commands():
    block = [strip_comment(line) for line in first_code_block(README.read_text()) if line.strip()]
    assert block == ci_commands(), (
        "README.md's first code block must hold exactly the commands .ci/run runs:\n"
        f"README: {block}\n.ci/run: {ci_commands()}"
    )


def test_readme_relative_links_resolve():
    text = README.read_text()
    # links inside code are not links
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) or target.startswith("#"):
            continue  # http(s)://, mailto:, in-page anchors
        path = target.split("#", 1)[0]
        if not (README.parent / path).exists():
            broken.append(target)
    assert not broken, f"README.md links to files that do not exist: {broken}"
