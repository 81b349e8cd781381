"""The code's shape, as docs/architecture.md promises it to a newcomer: `gan_dist/`'s modules import each other one
way (no cycle, and no import inside a function to dodge one), no function is over 80 lines, the loop's calls take
at most 6 positional arguments, and no script imports another script or anything of the loop but `train`.

Read from the source with `ast`, so a test fails with the module, line and name to fix.

    python -m pytest tests/test_anatomy.py -q
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gan_dist"
MAX_LINES = 80
MAX_POSITIONAL = 6


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def gan_dist_imports(tree: ast.Module) -> list[tuple[ast.stmt, str]]:
    """Every import of a gan_dist module in `tree` (at any depth), with the module it names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gan_dist":  # `from gan_dist import mnist`: the names are modules
                found += [(node, f"gan_dist.{alias.name}") for alias in node.names
                          if (PACKAGE / f"{alias.name}.py").is_file()]
            elif node.module.startswith("gan_dist."):
                found.append((node, node.module))
        elif isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names if alias.name.startswith("gan_dist.")]
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the gan_dist modules it imports, for every module of `package`."""
    return {f"gan_dist.{path.stem}": {name for _, name in gan_dist_imports(parsed(path))}
            for path in sorted(package.glob("*.py")) if path.name != "__init__.py"}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules that import each other (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_cycle_finder_finds_a_cycle_and_nothing_else():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_gan_dist_modules_import_each_other_one_way():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles in gan_dist/: " + "; ".join(" <-> ".join(group) for group in found)


def test_no_gan_dist_module_imports_the_package_inside_a_function():
    # An import inside a function hides a cycle from the test above. The package's own __init__ loads
    # load_generator lazily on purpose (light modules must not pull in torch through it) and is exempt.
    late = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = parsed(path)
        top = {id(node) for node in tree.body}
        late += [f"{path.name}:{node.lineno} imports {name}" for node, name in gan_dist_imports(tree)
                 if id(node) not in top]
    assert not late, "imports inside functions: " + "; ".join(late)


def functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_in_gan_dist_is_over_80_lines():
    long = [f"{path.name}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for path in sorted(PACKAGE.glob("*.py")) for fn in functions(parsed(path))
            if fn.end_lineno - fn.lineno + 1 > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines: " + "; ".join(long)


def test_the_loop_reads_in_one_screenful_and_its_calls_are_short():
    tree = parsed(PACKAGE / "loop.py")
    run = next(fn for fn in functions(tree) if fn.name == "run")
    assert run.end_lineno - run.lineno + 1 <= MAX_LINES
    crowded = [f"loop.py:{node.lineno} {ast.unparse(node.func)} ({len(node.args)} positional)"
               for node in ast.walk(tree) if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL]
    assert not crowded, f"calls with more than {MAX_POSITIONAL} positional arguments: " + "; ".join(crowded)


def test_scripts_import_no_other_script_and_of_the_loop_only_train():
    scripts = {path.stem for path in (REPO / "scripts").glob("*.py")}
    wrong = []
    for path in sorted((REPO / "scripts").glob("*.py")):
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] in scripts:
                    wrong.append(f"{path.name}:{node.lineno} imports the script {node.module}")
                if node.module == "gan_dist.loop":
                    wrong += [f"{path.name}:{node.lineno} imports loop.{alias.name}" for alias in node.names
                              if alias.name != "train"]
            elif isinstance(node, ast.Import):
                wrong += [f"{path.name}:{node.lineno} imports the script {alias.name}" for alias in node.names
                          if alias.name.split(".")[0] in scripts]
    assert not wrong, "; ".join(wrong)


def test_the_architecture_page_links_every_module_and_only_ones_that_exist():
    page = (REPO / "docs" / "architecture.md").read_text()
    linked = set(re.findall(r"\]\(\.\./gan_dist/(\w+)\.py\)", page))
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}
    assert linked - modules == set(), "docs/architecture.md links modules that do not exist"
    unnamed = {m for m in modules - linked if f"`{m}.py`" not in page and f"`{m}`" not in page}
    assert not unnamed, f"docs/architecture.md does not name {sorted(unnamed)}: say what they own"
