"""The README's quickstart is exactly two commands, and .ci/run runs exactly those."""

from __future__ import annotations

import re

from conftest import ROOT


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_is_two_commands_install_and_test():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert "pip install" in commands[0] and "fedrec" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in quickstart_commands():
        assert any(line.strip() == command or line.strip().startswith(command) for line in ci), command
    # pytest's "no tests collected" (exit 5) must fail CI, not pass it
    assert '"$status" -eq 5' in (ROOT / ".ci" / "run").read_text()
