"""The API reference builds from the docstrings with pdoc, without a single warning (scripts/build_api_docs.py),
with a page per public module and the protocols documented member by member."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("pdoc", reason="pdoc is a dev dependency (pip install -e .[dev])")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_api_docs.py"), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, f"the API reference warned or failed:\n{result.stderr[-4000:]}"
    assert "wrote" in result.stdout
    return out


def test_every_public_module_has_a_page(api):
    from tl_degeneracy.cli import SUBCOMMANDS

    pages = {str(p.relative_to(api)) for p in api.rglob("*.html")}
    for page in ["index.html", "tl_degeneracy.html", "tl_degeneracy/collection.html",
                 "tl_degeneracy/collection/stats.html", "tl_degeneracy/basis/protocol.html",
                 "tl_degeneracy/basis/sae_lens_export.html", "tl_degeneracy/interactions/edges.html",
                 "tl_degeneracy/llc/sampler.html", "tl_degeneracy/analysis/render.html"]:
        assert page in pages, page
    assert {f"tl_degeneracy/cli/{c.__name__.rsplit('.', 1)[1]}.html" for c in SUBCOMMANDS} <= pages
    assert not [p for p in pages if "/_" in p or p.startswith("_")]  # private modules and __main__ stay out
    assert (api / "search.js").is_file()


def test_the_basis_protocol_and_the_collection_are_documented(api):
    protocol = (api / "tl_degeneracy" / "basis" / "protocol.html").read_text()
    for member in ["Basis", "Basis.encode", "Basis.decode", "Basis.k", "Basis.d", "Basis.importance",
                   "Basis.fingerprint", "Basis.state", "Basis.from_state", "LinearMaps", "register_basis_kind"]:
        assert f'id="{member}"' in protocol, member
    assert "A basis of one hook point" in protocol  # the class docstring, not only its name
    collection = (api / "tl_degeneracy" / "collection.html").read_text()
    for member in ["Stats", "Stats.gram", "Stats.covariance", "RunConfig", "JacobianConfig", "collect"]:
        assert f'id="{member}"' in collection, member
