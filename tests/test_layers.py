"""The package layout is the architecture: dependencies point one way and method libraries import no command code."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "yolocomp"


def package_imports() -> dict[str, set[str]]:
    """Top-level yolocomp package (or module) -> the yolocomp packages it imports, anywhere in its code."""
    deps: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        owner = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "yolocomp" and len(parts) > 1 and parts[1] != owner:
                    deps[owner].add(parts[1])
    return deps


def test_no_package_cycles():
    deps = package_imports()

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in deps.get(start, ()))

    cycles = sorted(p for p in deps if reaches(p, p))
    assert not cycles, f"packages in an import cycle: {cycles}"


def test_method_libraries_import_no_command_code():
    deps = package_imports()
    for library in ("prune", "distill", "quant", "export", "eval", "integration", "config"):
        assert not deps[library] & {"commands", "cli", "recipe"}, f"{library} imports {deps[library]}"
    assert deps["config"] <= {"errors"}  # the vocabulary layer stands alone
    assert "export" not in deps["eval"]


def test_only_integration_knows_the_trainer():
    # Ultralytics' trainer internals (EMA, loaders, scaler, param-group tags) are read only in integration/
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "integration":
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {s}" for s in ("trainer.ema", "trainer.train_loader", "trainer.scaler") if s in text]
    assert not offenders
