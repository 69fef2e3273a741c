"""README's self-contained Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
# blocks that stand on their own (the others show how to fill in a user's own module or data)
RUNNABLE = [block for block in BLOCKS if "my_module" not in block and "    ..." not in block]


def test_readme_has_runnable_examples():
    assert len(RUNNABLE) >= 3


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(RUNNABLE[index], f"README block {index}", "exec"), {"__name__": "readme_example"})
