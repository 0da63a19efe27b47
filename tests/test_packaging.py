"""The install paths agree: pyproject.toml, environment.yml, Makefile."""

from __future__ import annotations

import re
import tomllib

import yaml


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower()


def _specs(requirements):
    return {_name(r): r.replace(" ", "") for r in requirements}


def test_environment_yml_matches_pyproject(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    wanted = _specs(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    have = _specs(r for r in pip_section if not r.startswith("-e"))
    assert "-e ." in pip_section
    # torch: pyproject leaves the build open, environment.yml pins the CPU one.
    assert have.pop("torch") == "torch==2.13.0"
    wanted.pop("torch")
    assert have == wanted


def test_makefile_pins_cpu_torch(repo_root):
    assert "TORCH_SPEC ?= torch==2.13.0" in (repo_root / "Makefile").read_text()


def test_readme_first_commands_are_make_targets(repo_root):
    readme = (repo_root / "README.md").read_text()
    commands = re.findall(r"^```(?:bash|sh)\n(.*?)\n```", readme, flags=re.M | re.S)
    assert commands[0].strip() == "make demo"
    assert commands[1].strip() == "make test"
    assert "make test" in (repo_root / ".ci" / "run").read_text()


# Every subcommand's --help: tests/test_cli_usage.py (the list comes from the parser).
