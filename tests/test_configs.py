"""The packaged configs: found by name from any folder, listed, shown and copied, and what the wheel carries.

The installed wheel itself is checked by ``.ci/run`` (it builds it, installs it into a fresh environment and runs
the quick start and a smoke sweep from a folder outside the repository).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import pl_pathsgd
from pl_pathsgd import configs
from pl_pathsgd.cli import main
from pl_pathsgd.experiments import grids

ROOT = Path(__file__).resolve().parents[1]
REPO_CONFIGS = sorted(ROOT.joinpath("configs").rglob("*.yaml"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_config_of_the_repository_has_a_name_and_reads_the_same_file():
    assert configs.root() == ROOT / "configs"  # a clone or an editable install reads configs/ in place
    expected = {file.relative_to(ROOT / "configs").with_suffix("").as_posix() for file in REPO_CONFIGS}
    assert set(configs.names()) == expected and len(expected) >= 13
    assert configs.names()[:3] == ["quickstart", "quickstart_adagrad", "quickstart_sgd"]  # top level first
    for name in expected:
        assert configs.path(name).read_bytes() == (ROOT / "configs" / f"{name}.yaml").read_bytes()
    assert configs.path("paper/smoke/figure1.yaml") == configs.path("paper/smoke/figure1")


@pytest.mark.parametrize("name, hint", [("quickstrat", "quickstart"), ("configs/quickstart.yaml", "quickstart"),
                                        ("configs/paper/smoke/figure1.yaml", "paper/smoke/figure1"),
                                        ("../pyproject.toml", None), ("zzz", None)])
def test_an_unknown_name_is_refused_with_the_names_listed(name, hint):
    with pytest.raises(configs.UnknownConfigError) as error:
        configs.path(name)
    message = str(error.value)
    assert all(known in message for known in configs.names())
    assert (f"did you mean {hint}?" in message) if hint else "did you mean" not in message


def test_the_wheel_layout_is_the_one_the_package_looks_for():
    """pyproject.toml lists its packages (setuptools' discovery does not combine with mapping configs/ into the
    package): the list must hold every package of the source tree and every folder of configs/."""
    [(mapped, folder)] = PYPROJECT["package-dir"].items()
    assert folder == "configs" and mapped == f"pl_pathsgd.{configs.PACKAGED.name}"
    code = {".".join(init.parent.relative_to(ROOT).parts) for init in ROOT.joinpath("pl_pathsgd").rglob("__init__.py")}
    data = {".".join((mapped, *d.relative_to(ROOT / "configs").parts)) for d in [ROOT / "configs", *ROOT.joinpath(
        "configs").rglob("*")] if d.is_dir()}
    missing, extra = (code | data) - set(PYPROJECT["packages"]), set(PYPROJECT["packages"]) - (code | data)
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert not extra, f"{sorted(extra)} in pyproject.toml's packages no longer exist"
    assert "*.yaml" in PYPROJECT["package-data"]["*"]


def test_packaged_copy_is_preferred_to_the_source_tree(tmp_path, monkeypatch):
    """How an installed wheel finds its configs: the package's own config_files folder, even beside a source tree."""
    packaged = tmp_path / "config_files"
    (packaged / "paper").mkdir(parents=True)
    (packaged / "mine.yaml").write_text("# Mine.\nseed_everything: 1\n")
    monkeypatch.setattr(configs, "PACKAGED", packaged)
    assert configs.root() == packaged and configs.names() == ["mine"]
    monkeypatch.setattr(configs, "PACKAGED", tmp_path / "absent")
    monkeypatch.setattr(configs, "SOURCE_TREE", tmp_path)  # neither a wheel's copy nor a repository
    with pytest.raises(FileNotFoundError, match="reinstall"):
        configs.root()


def test_config_names_on_the_command_line_become_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quickstart = str(configs.path("quickstart"))
    resolve = configs.resolve_config_args
    assert resolve(["fit", "--config", "quickstart", "--trainer.max_epochs=1"]) == [
        "fit", "--config", quickstart, "--trainer.max_epochs=1"]
    assert resolve(["fit", "--config=paper/smoke/figure2"]) == ["fit", f"--config={configs.path('paper/smoke/figure2')}"]
    assert resolve(["-c", "quickstart.yaml", "fit"]) == ["-c", quickstart, "fit"]
    (tmp_path / "quickstart").write_text("seed_everything: 3\n")  # a file of that name wins over the packaged one
    assert resolve(["fit", "--config", "quickstart"]) == ["fit", "--config", "quickstart"]
    for untouched in (["fit", "--config", "{trainer: {max_epochs: 1}}"], ["fit", "--config"], ["fit", "--help"],
                      ["fit", "--model.init_args.hidden=[4]"], ["fit", "--config", "--print_config"]):
        assert resolve(untouched) == untouched
    assert resolve({"fit": {}}) == {"fit": {}}
    with pytest.raises(configs.UnknownConfigError, match=r"--config quickstrat: there is no such file.*did you mean "
                                                         r"quickstart\?"):
        resolve(["fit", "--config", "quickstrat"])


def test_the_command_line_takes_a_packaged_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "quickstart", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] == "pl_pathsgd.data.DigitsDataModule"
    assert printed["model"]["init_args"]["optimizer"]["class_path"] == "pl_pathsgd.PathSGD"

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "quikstart"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("pl-pathsgd: error: --config quikstart") and "quickstart_sgd" in error
    assert "Traceback" not in error

    with pytest.raises(SystemExit) as exit_info:  # options of 0.1 are still caught in a config given by name
        main(["fit", "--config", "quickstart", "--model.init_args.lr=0.1"])
    assert exit_info.value.code == 2 and "model.init_args.lr on the command line was removed" in capsys.readouterr().err


def test_a_quick_start_by_name_trains_from_an_empty_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "quickstart", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
          "--trainer.enable_progress_bar=false"])
    assert list((tmp_path / "runs" / "quickstart").rglob("events.out.tfevents.*"))  # logs where the user is


def test_configs_list_show_and_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert configs.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert str(configs.root()) in listed and "pl-pathsgd fit --config NAME" in listed
    for name in configs.names():
        assert f"  {name} " in listed
    assert "Path-SGD on scikit-learn's bundled 8x8 digits" in listed
    assert configs.main([]) == 0 and capsys.readouterr().out == listed  # list is the default

    configs.main(["show", "paper/smoke/figure3"])
    assert capsys.readouterr().out == configs.path("paper/smoke/figure3").read_text()

    configs.main(["copy", "quickstart", "my.yaml"])
    assert (tmp_path / "my.yaml").read_bytes() == configs.path("quickstart").read_bytes()
    assert "pl-pathsgd fit --config my.yaml" in capsys.readouterr().out
    configs.main(["copy", "paper/smoke/figure1"])  # into the current folder, under its own name
    configs.main(["copy", "quickstart_sgd", "sub/"])  # into a new folder
    assert (tmp_path / "figure1.yaml").is_file() and (tmp_path / "sub" / "quickstart_sgd.yaml").is_file()

    (tmp_path / "my.yaml").write_text("edited\n")
    with pytest.raises(SystemExit) as exit_info:
        configs.main(["copy", "quickstart", "my.yaml"])
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "my.yaml").read_text() == "edited\n"  # nothing lost
    configs.main(["copy", "quickstart", "my.yaml", "--force"])
    assert (tmp_path / "my.yaml").read_bytes() == configs.path("quickstart").read_bytes()

    for bad in (["copy", "nope"], ["show", "nope"], ["copy"], ["copy", "--all"], ["copy", "--all", "a", "b"]):
        with pytest.raises(SystemExit) as exit_info:
            configs.main(bad)
        assert exit_info.value.code == 2, bad
        assert "Traceback" not in capsys.readouterr().err


def test_copy_all_gives_a_folder_the_runner_takes(tmp_path, capsys):
    written = configs.copy_all(tmp_path / "mine")
    assert len(written) == len(configs.names())
    for name in configs.names():
        assert (tmp_path / "mine" / f"{name}.yaml").read_bytes() == configs.path(name).read_bytes()
    assert grids.config_path("figure3", "digits", True, tmp_path / "mine") == tmp_path / "mine/paper/smoke/figure3.yaml"
    (tmp_path / "mine" / "quickstart.yaml").write_text("edited\n")
    with pytest.raises(FileExistsError, match="--force"):
        configs.copy_all(tmp_path / "mine")
    assert (tmp_path / "mine" / "quickstart.yaml").read_text() == "edited\n"  # nothing written
    configs.copy_all(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "quickstart.yaml").read_bytes() == configs.path("quickstart").read_bytes()


def test_the_runner_finds_the_configs_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the package's own
    assert grids.config_path("figure1", "digits", True) == configs.path("paper/smoke/figure1")
    assert grids.config_path("figure3", "svhn", False) == configs.path("paper/figure3_svhn")
    configs.copy_all(tmp_path / "configs")  # a configs/ folder where the runner starts is used, as before
    assert grids.config_path("figure1", "digits", True) == tmp_path / "configs/paper/smoke/figure1.yaml"


def test_the_entry_point_takes_a_config_name(tmp_path):
    """The command as typed: the name is resolved on the process's own command line (``sys.argv``)."""
    command = Path(sys.executable).parent / "pl-pathsgd"  # the installed entry point (pip install -e .)
    result = subprocess.run([str(command), "fit", "--config", "paper/smoke/figure2", "--print_config"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["trainer"]["max_epochs"] == yaml.safe_load(configs.path("paper/smoke/figure2").read_text())[
        "trainer"]["max_epochs"]
    assert printed["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.SGD"


def test_readme_installed_route_names_this_wheel_and_real_configs():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Installed package")
    install, use = re.findall(r"```bash\n(.*?)\n```", readme[start:readme.index("\n## ", start + 1)], flags=re.S)
    assert f"'dist/pl_pathsgd-{pl_pathsgd.__version__}-py3-none-any.whl[all]'" in install
    named = re.findall(r"--config (\S+)", use)
    assert "quickstart" in named and all(configs.path(name) for name in named if name != "my.yaml")
    assert "configs copy quickstart my.yaml" in use and "--smoke" in use
