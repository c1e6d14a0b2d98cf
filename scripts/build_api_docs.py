"""Build the API reference of tl_degeneracy from its docstrings with pdoc; every warning is an error.

    .venv/bin/python scripts/build_api_docs.py [--out build/api]

One page per public module (``tl_degeneracy/collection.html``, ``tl_degeneracy/basis/protocol.html``, ...),
Google-style docstrings. pdoc follows a package's ``__all__``, which lists names, not submodules, so
every module is named to it here (``_private`` modules and ``__main__`` left out). Every warning pdoc
or an import raises (an annotation that does not resolve, a module that does not import) is printed,
and the exit code is 1 if there was any: CI keeps the reference complete.
"""
from __future__ import annotations

import argparse
import pkgutil
import sys
import warnings
from pathlib import Path

PACKAGE = "tl_degeneracy"


def public_modules(package: str) -> list[str]:
    """Every module of ``package`` whose dotted name has no ``_``-prefixed part, the package first."""
    root = __import__(package)
    found = [m.name for m in pkgutil.walk_packages(root.__path__, f"{package}.")]
    return [package] + sorted(n for n in found if not any(p.startswith("_") for p in n.split(".")))


def module_specs(modules: list[str]) -> list[str]:
    """The fewest names that make pdoc document ``modules``: pdoc adds the submodules a package's
    ``__all__`` names by itself, and warns when a module is named twice."""
    from pdoc.extract import walk_specs

    specs: list[str] = []
    covered: set[str] = set()
    for name in modules:
        if name not in covered:
            specs.append(name)
            covered.update(walk_specs([name]))
    return specs


def build(out: Path) -> list[str]:
    """Write the reference to ``out``; return every warning raised meanwhile (as text, deduplicated)."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="google")
    with warnings.catch_warnings(record=True) as caught:  # listing the modules imports them: inside too
        warnings.simplefilter("always")
        pdoc.pdoc(*module_specs(public_modules(PACKAGE)), output_directory=out)
    return list(dict.fromkeys(f"{w.category.__name__}: {' '.join(str(w.message).split())}" for w in caught))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/api"),
                        help="the folder to write the HTML into (default: %(default)s)")
    args = parser.parse_args(argv)
    problems = build(args.out)
    for problem in problems:
        print(problem, file=sys.stderr)
    pages = sum(1 for _ in args.out.rglob("*.html"))
    if problems:
        print(f"{len(problems)} warning(s): fix the docstrings or annotations above ({pages} pages written to "
              f"{args.out})", file=sys.stderr)
        return 1
    print(f"wrote {pages} pages to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
