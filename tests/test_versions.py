"""The declared versions mean something: every dependency in pyproject.toml has a lower bound, the oldest record in
docs/versions.json ran the suite at exactly those bounds (a bound moved without rerunning it fails here), and the
README's version table is the one scripts/versions.py writes from that record."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("versions", REPO / "scripts" / "versions.py")
versions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(versions)


def test_every_dependency_has_a_lower_bound():
    unbounded = [name for name, (bound, _) in versions.requirements().items() if bound is None]
    assert not unbounded, f"give these a >= bound in pyproject.toml (the oldest version the suite passed with): " \
                          f"{unbounded}"


def test_the_oldest_record_ran_at_every_bound_of_pyproject():
    record = json.loads(versions.RECORD.read_text())["oldest"]["versions"]
    off = {name: (f">={bound}", record.get(name)) for name, (bound, _) in versions.requirements().items()
           if name not in versions.WITHOUT_IN_OLDEST and not versions.at_bound(name, record.get(name), bound)}
    assert not off, f"bounds not tested at their value (bound, version the oldest suite ran with): {off}; " \
                    "run `python scripts/versions.py test` in an environment built as its docstring says"


def test_the_readme_table_is_the_scripts_own():
    record = json.loads(versions.RECORD.read_text())
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index(versions.BEGIN):readme.index(versions.END) + len(versions.END)]
    assert block == versions.table(record, versions.requirements())


def test_lowest_pins_every_bound_that_installs_beside_the_others(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nrequires-python = ">=3.10"\ndependencies = ["torch>=2.4", "numpy>=1.26",'
                         ' "tomli>=2; python_version < \'3.11\'"]\n[project.optional-dependencies]\n'
                         'report = ["wandb-workspaces>=0.4.13"]\ntest = ["pytest>=8", "psutil"]\n')
    reqs = versions.requirements(pyproject)
    assert reqs == {"python": ("3.10", "core"), "torch": ("2.4", "core"), "numpy": ("1.26", "core"),
                    "wandb-workspaces": ("0.4.13", "report"), "pytest": ("8", "test"), "psutil": (None, "test")}
    assert versions.lowest(reqs) == ["torch==2.4", "numpy==1.26", "pytest==8"]
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "versions.py"), "lowest"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == versions.lowest(versions.requirements())


def test_at_bound_reads_release_numbers():
    assert versions.at_bound("torch", "2.4.0+cpu", "2.4") and versions.at_bound("pytest", "8.0.0", "8")
    assert not versions.at_bound("torch", "2.4.1", "2.4") and not versions.at_bound("numpy", None, "1.26")
    assert versions.at_bound("python", "3.10.13", "3.10") and not versions.at_bound("python", "3.11.7", "3.10")
