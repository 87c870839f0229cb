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


def test_the_first_command_installs_what_the_job_needs_not_the_test_tools():
    setup, tests = _readme_commands()
    assert '".[all]"' in setup and "dev" not in setup
    assert '".[all,dev]"' in tests


def test_the_readme_support_table_is_the_declarations():
    from trackbridge.tracker import support_table

    block = re.search(
        r"<!-- trackers:begin[^\n]*-->\n(.*?)<!-- trackers:end -->", (ROOT / "README.md").read_text(), re.S
    )
    assert block is not None
    assert block.group(1).strip() == support_table(), "regenerate the table with the command in its marker"


def test_every_module_of_the_package_folder_has_a_layer():
    """A new module in bridge/ must be placed: in the core contract (imports nothing
    above it) or named as one of the top layer's (cli, sync, verify, shim ...)."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    core = set(contracts[0]["source_modules"])
    top = set(contracts[0]["forbidden_modules"]) | {"trackbridge"}
    for f in (ROOT / "bridge").glob("*.py"):
        name = "trackbridge" if f.stem == "__init__" else f"trackbridge.{f.stem}"
        assert name in core | top, f"bridge/{f.name} is in no layer of pyproject's import contracts"
