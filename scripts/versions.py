"""Which versions of its dependencies gan-dist's test suite passed with, written into the README by this script.

    python scripts/versions.py lowest > lowest.txt   # pip constraints: every dependency at its lower bound
    python scripts/versions.py show                  # the installed version of every dependency
    python scripts/versions.py test [PYTEST ARGS]    # run the README's test command; when it passes, record
    python scripts/versions.py readme                # write the README's table again from docs/versions.json

Every dependency in pyproject.toml has a lower bound (`>=`), and that bound is the oldest version the suite passed
with. `test` runs `python -m pytest -q` in the current environment and, only when it passes, writes what was
installed into docs/versions.json and the README's table between its `versions:begin/end` markers: as the `oldest`
record when every dependency sits at its bound, else as the `latest` one. To check the bounds:

    python3.10 -m venv /tmp/lowest && . /tmp/lowest/bin/activate
    python scripts/versions.py lowest > /tmp/lowest.txt
    pip install -c /tmp/lowest.txt -e . pytest pytest-xdist psutil 'tomli; python_version < "3.11"'
    python scripts/versions.py test

(torch's oldest allowed release exists on PyPI only as a CUDA build, several GB.) The `report` extra's
wandb-workspaces needs a newer wandb than the core's bound, so the oldest record runs without it and its tests skip.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "docs" / "versions.json"
BEGIN, END = "<!-- versions:begin -->", "<!-- versions:end -->"
BOUND = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([^\s,;]+)")
# A package the oldest record runs without, and why (its bound cannot be installed beside the core's bounds).
WITHOUT_IN_OLDEST = {"wandb-workspaces": "needs wandb>=0.28.2; tested in the latest record",
                     "torchmetrics": "added after the oldest record (tests/test_metrics.py checks FID and KID against "
                                     "it); tested in the latest record",
                     "pytest-xdist": "added after the oldest record (the suite's two workers); tested in the latest "
                                     "record"}


def requirements(pyproject: Path = REPO / "pyproject.toml") -> dict[str, tuple[str | None, str]]:
    """name -> (lower bound, where it is required: 'core' or the extra's name), Python as 'python'. A requirement
    without a `>=` bound has None."""
    project = tomllib.loads(pyproject.read_text())["project"]
    found: dict[str, tuple[str | None, str]] = {"python": (project["requires-python"].removeprefix(">="), "core")}
    groups = [("core", project["dependencies"])] + list(project.get("optional-dependencies", {}).items())
    for group, specs in groups:
        for spec in specs:
            if ";" in spec:  # an environment marker: required only where it holds
                continue
            match = BOUND.match(spec)
            name = match.group(1) if match else re.split(r"[\s<>=!~\[]", spec.strip(), maxsplit=1)[0]
            found.setdefault(canonical(name), (match.group(2) if match else None, group))
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> str | None:
    if name == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", version).group(0).split("."))


def at_bound(name: str, version: str | None, bound: str) -> bool:
    """Whether an installed version is the bound itself: '2.4' is met by 2.4.0 and 2.4.0+cpu, not by 2.4.1; Python's
    '3.10' by any 3.10.x."""
    if version is None:
        return False
    have, want = release(version)[:2 if name == "python" else None], release(bound)
    width = max(len(have), len(want))
    return have + (0,) * (width - len(have)) == want + (0,) * (width - len(want))


def lowest(reqs: dict[str, tuple[str | None, str]]) -> list[str]:
    return [f"{name}=={bound}" for name, (bound, _) in reqs.items()
            if name != "python" and bound is not None and name not in WITHOUT_IN_OLDEST]


def table(record: dict, reqs: dict[str, tuple[str | None, str]]) -> str:
    """The README's block: one row per dependency, a column per record, and how each record's suite ended."""
    kinds = [k for k in ("oldest", "latest") if k in record]
    heads = {"oldest": "oldest allowed (the bound)", "latest": "latest installed"}
    lines = [BEGIN, "", "| package | bound in pyproject.toml | " + " | ".join(heads[k] for k in kinds) + " |",
             "| --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
    for name, (bound, group) in reqs.items():
        cells = [record[k]["versions"].get(name) or (f"(without: {WITHOUT_IN_OLDEST[name]})" if k == "oldest" and
                                                     name in WITHOUT_IN_OLDEST else "(not installed)") for k in kinds]
        where = "" if group == "core" else f" (`{group}` extra)"
        lines.append(f"| {name}{where} | {'>=' + bound if bound else 'none'} | " + " | ".join(cells) + " |")
    lines.append("")
    for k in kinds:
        r = record[k]
        lines.append(f"- {heads[k]}: `python -m pytest -q` gave {r['result']} on {r['date']} (commit {r['commit']}, "
                     f"{r['platform']})")
    return "\n".join(lines + ["", "Written by `python scripts/versions.py test`; do not edit by hand.", END])


def write_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {readme} has no {BEGIN} ... {END} block to write the versions into")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + block + rest.split(END, 1)[1])


def run_suite(pytest_args: list[str]) -> int:
    reqs = requirements()
    versions = {name: installed(name) for name in reqs}
    oldest = all(at_bound(n, versions[n], b) for n, (b, _) in reqs.items() if b and n not in WITHOUT_IN_OLDEST)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", *pytest_args], cwd=REPO, stdout=subprocess.PIPE,
                          text=True)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        print(f"error: the suite failed (exit {done.returncode}); nothing recorded", file=sys.stderr)
        return done.returncode
    summary = [line.strip("= ") for line in done.stdout.splitlines() if re.search(r"\d+ passed", line)][-1]
    # Imported only here: `lowest` runs before gan-dist and its dependencies are installed.
    from gan_dist.provenance import git_commit

    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    kind = "oldest" if oldest else "latest"
    record[kind] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                    "commit": git_commit(short=True, repo=REPO), "result": summary + (
                        f" with `{' '.join(pytest_args)}`" if pytest_args else ""),
                    "platform": f"{platform.system()} {platform.machine()}", "versions": versions}
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    write_readme(REPO / "README.md", table(record, reqs))
    print(f"recorded as the {kind} versions in {RECORD.relative_to(REPO)} and README.md")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["lowest", "show", "test", "readme"])
    args, pytest_args = parser.parse_known_args()
    if args.command == "lowest":
        print("\n".join(lowest(requirements())))
    elif args.command == "show":
        for name, (bound, _) in requirements().items():
            print(f"{name} {installed(name) or '(not installed)'} (bound: {'>=' + bound if bound else 'none'})")
    elif args.command == "readme":
        write_readme(REPO / "README.md", table(json.loads(RECORD.read_text()), requirements()))
    else:
        return run_suite(pytest_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
