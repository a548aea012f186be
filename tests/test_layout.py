"""The package keeps its shape: every module says what it is for, functions stay short, no
import cycle, no stage imports another, the training loop talks to accelerate only through the
Strategy, only the config imports Hydra and it imports no torch, and tests use the Trainer's and
Strategy's public API."""

import ast
import builtins
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _imported_modules(path: Path, known: set[str]) -> set[str]:
    """The pipeline modules `path` imports anywhere in its body (lazy imports included)."""
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= submodules or ({node.module} & known)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_opens_with_what_it_is_for(path):
    if path.name == "__init__.py" and not path.read_text().strip():
        return
    assert ast.get_docstring(_tree(path)), f"{path} has no module docstring"


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_no_module_is_named_after_a_builtin():
    assert not [p for p in MODULES if p.stem in dir(builtins)]


def test_there_is_no_import_cycle():
    names = {_module_name(p): p for p in MODULES}
    graph = {name: _imported_modules(path, set(names)) - {name} for name, path in names.items()}
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_no_stage_imports_another_stage():
    stages = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "context", "base"}
    for name in stages:
        imported = _imported_modules(PACKAGE / "stages" / f"{name}.py", {f"pipeline.stages.{s}" for s in stages})
        assert not imported, name


def test_the_loop_reaches_accelerate_only_through_the_strategy_and_the_runner_reads_the_stage_contract():
    loop = _tree(PACKAGE / "train" / "loop.py")
    modules = {a.name for n in ast.walk(loop) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(loop) if isinstance(n, ast.ImportFrom) and n.module}
    assert not [m for m in modules if m.split(".")[0] == "accelerate"]
    assert "getattr(stage" not in (PACKAGE / "runner.py").read_text()


def test_the_trainer_only_trains():
    """At most 250 lines, and building one is a short __init__: every start-of-run choice is made
    in train/choices.py before it."""
    trainer = next(n for n in _tree(PACKAGE / "train" / "loop.py").body if getattr(n, "name", "") == "Trainer")
    assert trainer.end_lineno - trainer.lineno + 1 <= 250
    init = next(n for n in trainer.body if getattr(n, "name", "") == "__init__")
    assert init.end_lineno - init.lineno + 1 <= 20


def test_the_config_composes_and_checks_without_torch():
    """A config typo is refused before torch is imported (it costs seconds from a cold start)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pipeline.config.compose import compose_config\n"
        "from pipeline.errors import PipelineError\n"
        "compose_config(['stage=all'])\n"
        "try:\n    compose_config(['stage=all', 'train.decay=cosin'])\nexcept PipelineError:\n    print('refused')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "refused", out.stderr


def test_tests_use_no_private_member_of_the_trainer_or_the_strategy():
    private = set()
    for module, cls in (("loop.py", "Trainer"), ("strategy.py", "Strategy")):
        body = next(n for n in _tree(PACKAGE / "train" / module).body if getattr(n, "name", "") == cls).body
        private |= {n.name for n in body if isinstance(n, ast.FunctionDef) and n.name.startswith("_")}
        private |= {
            t.attr
            for n in ast.walk(next(f for f in body if getattr(f, "name", "") == "__init__"))
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Attribute) and t.attr.startswith("_")
        }
    private -= {"__init__"}
    used = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Attribute) and node.attr in private:
                used.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert private and not used, used


def test_only_the_config_package_imports_hydra():
    """Hydra lives at the edge: components take plain arguments or spec dataclasses."""
    importers = []
    for path in MODULES:
        if "config" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(_tree(path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(n.split(".")[0] in ("hydra", "omegaconf") for n in names):
                importers.append(str(path.relative_to(PACKAGE)))
    assert not importers, importers
