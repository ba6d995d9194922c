"""What the code imports is declared in pyproject.toml: the package's third-party imports in `dependencies`, the
tests' in `dependencies` or the `test` extra, the benchmarks' in `dependencies` or the `bench` extra.

Imports are read with `ast` from every module, including the ones inside functions: a lazy import of an undeclared
module fails just the same, only later (`smollchat download` died on huggingface_hub 0.36 for want of `httpx2`).
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

#: Package imports that are optional at run time, with the extra that declares them. Triton: the GPU kernels in
#: engine/ops/*/triton.py load only when ops.backend() picks them (CUDA builds of torch bring triton); the test
#: extra installs it so CPU machines run those kernels under TRITON_INTERPRET=1.
OPTIONAL = {"triton": "test", "transformers": "bench", "gguf": "bench", "genesis": "bench"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(requirements: list[str]) -> set[str]:
    return {_norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r).group(1)) for r in requirements}


def _imports(folder: Path) -> dict[str, set[str]]:
    """Top-level name of every absolute import in every module under `folder` -> the files that import it."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _third_party(folder: Path) -> dict[str, set[str]]:
    # The project's own code: the package, and for scripts and tests the modules beside them that they put on
    # sys.path (tests/fakehub.py). Inside the package every own import is relative or `chatapp.`.
    local = {"chatapp"}
    if folder.name != "chatapp":
        local |= {folder.name} | {p.stem for p in folder.rglob("*.py")}
    return {m: files for m, files in _imports(folder).items()
            if m not in sys.stdlib_module_names and m not in local}


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    # A module that is not installed here (tomli on 3.11+) is taken to be its own distribution's name.
    return {_norm(d) for d in _installed().get(module, [module])}


@pytest.mark.parametrize("folder, extra", [("chatapp", None), ("tests", "test"), ("bench", "bench")])
def test_every_imported_module_is_declared(folder, extra):
    if not (ROOT / folder).is_dir():
        pytest.skip(f"no {folder}/ folder")
    extras = PYPROJECT.get("optional-dependencies", {})
    allowed = _declared(PYPROJECT["dependencies"]) | _declared(extras.get(extra, []) if extra else [])
    missing = []
    for module, files in sorted(_third_party(ROOT / folder).items()):
        where = allowed
        if extra is None and module in OPTIONAL:
            where = _declared(extras.get(OPTIONAL[module], []))
        if not _distributions(module) & where:
            missing.append(f"{module} (distribution {'/'.join(sorted(_distributions(module)))}, imported by "
                           f"{', '.join(sorted(files)[:3])})")
    section = "dependencies" + (f" or the {extra!r} extra" if extra else "")
    hint = "" if extra else (" (a module only an optional feature imports, lazily, goes in an extra and in OPTIONAL "
                             "in tests/test_packaging.py)")
    assert not missing, f"imported but not declared in pyproject.toml's {section}{hint}: " + "; ".join(missing)


def test_the_package_imports_are_found():
    # Guards the walk itself: the package's main libraries are seen, including a lazy one inside a function.
    found = _third_party(ROOT / "chatapp")
    assert {"torch", "textual", "huggingface_hub", "filelock"} <= set(found)
    assert "chatapp/hub.py" in found["filelock"]


def test_every_dependency_has_a_version_bound():
    unbounded = [r for r in PYPROJECT["dependencies"] if not re.search(r"(>=|==|~=)", r.split(";")[0])]
    assert not unbounded, f"dependencies without a tested lower bound: {unbounded}"
