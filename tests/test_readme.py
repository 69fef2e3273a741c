"""README's commands and self-contained Python examples run as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
# blocks that stand on their own (the others show how to fill in a user's own module or data)
RUNNABLE = [block for block in BLOCKS if "my_module" not in block and "    ..." not in block]
QUICK_START = README[README.index("## Quick start"):README.index("\n## ", README.index("## Quick start") + 1)]
RUN_COMMAND, TEST_COMMAND = re.findall(r"```bash\n(.*?)\n```", QUICK_START, flags=re.S)
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_readme_has_runnable_examples():
    assert len(RUNNABLE) >= 3


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(RUNNABLE[index], f"README block {index}", "exec"), {"__name__": "readme_example"})


def test_quick_start_installs_what_its_commands_need_and_ci_runs_the_test_command():
    install, run = (part.strip() for part in RUN_COMMAND.split("&&"))
    assert install == "pip install -e '.[digits]'" and "scikit-learn" in EXTRAS["digits"][0]  # the digits data
    assert run == "pl-pathsgd fit --config configs/quickstart.yaml"
    assert "DigitsDataModule" in (ROOT / run.split()[-1]).read_text()
    assert TEST_COMMAND == "pip install -e '.[dev]' && python -m pytest -q"
    for extra in re.findall(r"\.\[(\w+)\]", README):
        assert extra in EXTRAS, extra
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()


def test_quick_start_command_runs(tmp_path):
    """The quick start as typed (one epoch here), through the installed ``pl-pathsgd`` entry point."""
    run = shlex.split(RUN_COMMAND.split("&&")[1])
    command = [str(Path(sys.executable).parent / run[0]), *run[1:3], str(ROOT / run[3]),
               "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
               f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^Final: train error 0\.\d+, val error 0\.\d+, test error 0\.\d+$", result.stderr, re.M)
    assert list((tmp_path / "runs" / "quickstart").rglob("events.out.tfevents.*"))


def test_the_version_is_written_once():
    import importlib.metadata

    import pl_pathsgd

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("pl-pathsgd") == pl_pathsgd.__version__
