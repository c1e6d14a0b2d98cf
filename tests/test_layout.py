"""The package's architecture, enforced: layered imports, no private names across modules, a light CLI.

- import-linter's contracts (``pyproject.toml``) hold, and an upward import breaks them;
- no module imports another module's private (``_name``) member — ruff's PLC2701 skips relative
  imports, so the check walks every ``from … import`` itself;
- ``tl-degeneracy --help`` and usage errors import neither torch nor TransformerLens.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tl_degeneracy"
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(package: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from … import`` reads from, inside ``package`` (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    return ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))


def private_imports(root: Path, files: list[Path]) -> list[str]:
    found = []
    for path in files:
        name = _module_name(root, path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _target(package, node)
            if not target.startswith("tl_degeneracy"):
                continue
            for alias in node.names:
                parts = [*target.split("."), alias.name]
                if any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: from {'.' * node.level}"
                                 f"{node.module or ''} import {alias.name}")
    return found


def test_no_private_name_is_imported_across_modules():
    files = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "tests").rglob("*.py")) + \
        sorted((REPO / "examples").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))
    assert private_imports(REPO, files) == []


def test_the_private_import_check_can_fail(tmp_path):
    bad = tmp_path / "tl_degeneracy" / "sub" / "mod.py"
    bad.parent.mkdir(parents=True)
    (tmp_path / "tl_degeneracy" / "__init__.py").write_text("")
    (bad.parent / "__init__.py").write_text("")
    bad.write_text("from ..collection.batch_pass import _Masks\nfrom . import _helpers\nfrom .other import ok\n")
    assert private_imports(tmp_path, [bad]) == [
        "tl_degeneracy/sub/mod.py:1: from ..collection.batch_pass import _Masks",
        "tl_degeneracy/sub/mod.py:2: from . import _helpers"]


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed (pip install -e .[dev])")
def test_import_contracts_hold():
    result = subprocess.run([LINT_IMPORTS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed (pip install -e .[dev])")
def test_an_upward_import_breaks_the_layers(tmp_path):
    """A copy of the package where the streaming core imports the command line: lint-imports refuses it."""
    shutil.copytree(PACKAGE, tmp_path / "tl_degeneracy",
                    ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "*.gz", "tokenizer.json", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    stats = tmp_path / "tl_degeneracy" / "collection" / "stats.py"
    stats.write_text(stats.read_text() + "\n\ndef _upward():\n    from ..cli import common  # noqa: F401\n")
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([LINT_IMPORTS], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "tl_degeneracy.collection.stats -> tl_degeneracy.cli.common" in result.stdout
    assert "BROKEN" in result.stdout


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_and_usage_errors_import_no_torch():
    code = ("import sys, contextlib, io\n"
            "from tl_degeneracy.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    codes = [main(['--help']), main(['analyze', '--help']), main(['analyze', '--tokens', '0']),\n"
            "             main(['llc', '--help']), main(['nonsense'])]\n"
            "heavy = sorted(m for m in ('torch', 'transformer_lens', 'datasets', 'transformers') if m in sys.modules)\n"
            "print(codes, heavy)\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[0, 0, 2, 0, 2] []"


def test_help_answers_quickly():
    """Generous bound for a loaded CI machine; on an idle one it is ~0.1 s (benchmarks/README.md)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tl_degeneracy", "--help"], capture_output=True, text=True,
                            timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and "analyze" in result.stdout
    assert elapsed < 5.0, f"--help took {elapsed:.2f} s"


def test_the_package_imports_lazily():
    result = _run("import sys, tl_degeneracy as t\nprint('torch' in sys.modules)\n"
                  "t.collect\nprint('torch' in sys.modules, t.collect.__module__, t.llc.__name__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True", "tl_degeneracy.collection.grams", "tl_degeneracy.llc"]


def test_every_public_name_resolves():
    import tl_degeneracy as tld

    missing = [name for name in tld.__all__ if getattr(tld, name, None) is None]
    assert missing == []
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        tld.nonsense  # noqa: B018
