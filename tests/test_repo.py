"""The README's promises about CI hold: .ci/run runs the README's test command as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)[:2]


def test_readme_opens_with_setup_then_tests():
    setup, tests = _readme_commands()
    assert "pip install" in setup and "trackbridge quickstart" in setup
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_exactly():
    _, tests = _readme_commands()
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests.strip() in ci_lines
