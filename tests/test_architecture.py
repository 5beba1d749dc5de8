"""The codebase's shape, checked (issue 14): clients never reach activity code, packages import each
other without cycles, modules stay small. Imports are read with ``ast``, module and function level."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = (
    "activities",
    "alert_intake",
    "approval_page",
    "benchmarks",
    "config",
    "contracts",
    "database",
    "devstack",
    "local_platform",
    "migrations",
    "remediation_client",
    "starters",
    "worker",
    "workflows",
)
# What incident commanders, approvers and the alert intake run: none of it may load activity code.
CLIENTS = (
    "remediation_client",
    "alert_intake",
    "approval_page",
    "starters.incident_commands",
    "starters.cli_app",
)
MAX_LINES = 500
LARGER_ALLOWED = {"contracts/models.py"}  # the boundary models, one place for every shape


# The embedded stack and the stand-in are their own distribution, in embedded/.
EMBEDDED = ("devstack", "local_platform")


def package_root(package: str) -> Path:
    """The folder holding ``package``."""
    return ROOT / "embedded" if package in EMBEDDED else ROOT


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        base = package_root(package)
        for path in (base / package).rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (deferred imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            # The longest project module the name denotes (a submodule, or the module of an attribute).
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def reachable(start: str, edges: dict[str, set[str]]) -> dict[str, str]:
    """Every module ``start`` loads, directly or not, with the module that imports it."""
    seen: dict[str, str] = {}
    stack = [start]
    while stack:
        current = stack.pop()
        for target in edges.get(current, set()):
            if target not in seen and target != start:
                seen[target] = current
                stack.append(target)
    return seen


def test_clients_never_load_activity_code() -> None:
    edges = graph()
    for client in [m for m in edges if m.startswith(CLIENTS)]:
        loaded = reachable(client, edges)
        offending = sorted(m for m in loaded if m == "activities" or m.startswith("activities."))
        assert not offending, f"{client} loads {offending[0]} (imported by {loaded[offending[0]]})"


def test_packages_import_each_other_without_cycles() -> None:
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph().items():
        source = module.split(".")[0]
        packages[source] |= {t.split(".")[0] for t in targets if t.split(".")[0] != source}
    cycles = []
    for package in packages:
        for other in reachable(package, packages):
            if package in reachable(other, packages):
                cycles.append(tuple(sorted((package, other))))
    assert not sorted(set(cycles)), f"package import cycles: {sorted(set(cycles))}"


def test_modules_stay_small() -> None:
    too_big = {
        str(path.relative_to(ROOT)): lines
        for path in module_files().values()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
        and str(path.relative_to(ROOT)) not in LARGER_ALLOWED
    }
    assert not too_big, f"modules over {MAX_LINES} lines: {too_big}"


def test_the_product_loads_the_embedded_stack_only_where_a_command_needs_it() -> None:
    # The production install has no devstack or local_platform (embedded/ is its own distribution):
    # only the commands that run the local stack reach for them, after `need_embedded` has checked.
    edges = graph()
    importers = {
        module
        for module, targets in edges.items()
        if module.split(".")[0] not in (*EMBEDDED, "benchmarks")
        and any(t.split(".")[0] in EMBEDDED for t in targets)
    }
    assert importers == {"starters.demo", "starters.stack_commands"}


def test_the_cli_lists_every_trigger_without_loading_the_models() -> None:
    from contracts.models import Trigger
    from contracts.names import TRIGGERS

    assert tuple(t.value for t in Trigger) == TRIGGERS


def test_help_loads_neither_the_temporal_sdk_nor_pydantic_nor_the_settings() -> None:
    # `remediate --help` answers from the command definitions alone (docs/performance.md, "The CLI").
    probe = (
        "import sys; sys.argv = ['remediate', '--help']\n"
        "from starters.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('temporalio', 'pydantic', 'config.settings', 'asyncpg', 'nats')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
