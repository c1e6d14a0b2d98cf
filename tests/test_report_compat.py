"""report.json of release 0.2.0 (written before the report had typed sections) loads and writes back
unchanged: every section, the interaction graph's and the SGLD's included. The file in tests/data was
written by ``tl-degeneracy analyze --tokens 512 --interactions --llc 1e-3 ...`` at commit c38944d."""
from __future__ import annotations

import json
from pathlib import Path

from tl_degeneracy.analysis import AnalysisReport
from tl_degeneracy.analysis.llc import table_rows

OLD = Path(__file__).resolve().parent / "data" / "report_v2_from_0.2.0.json"


def contains(new, old, path="") -> list[str]:
    """Where ``new`` lacks or changes something ``old`` has (new keys are allowed)."""
    if isinstance(old, dict):
        if not isinstance(new, dict):
            return [path]
        return [p for k, v in old.items()
                for p in (contains(new[k], v, f"{path}.{k}") if k in new else [f"{path}.{k}"])]
    if isinstance(old, list):
        if not isinstance(new, list) or len(new) != len(old):
            return [path]
        return [p for i, (a, b) in enumerate(zip(new, old)) for p in contains(a, b, f"{path}[{i}]")]
    return [] if new == old else [path]


def test_a_0_2_0_report_loads_and_keeps_everything():
    data = json.loads(OLD.read_text())
    report = AnalysisReport.from_dict(data)
    assert contains(json.loads(json.dumps(report.to_dict())), data) == []
    again = AnalysisReport.from_dict(report.to_dict()).to_dict()
    assert again == report.to_dict()


def test_its_sections_read_as_attributes():
    report = AnalysisReport.load(OLD)
    section = report.interactions
    assert section is not None and section.config.n_probes == 2 and section.edge_tokens == 128
    assert {r.basis for r in section.sparsity} == {"interaction", "pca", "standard"}
    assert all(0 < r.fraction(0.99) <= 1 for r in section.sparsity)
    assert section.modules["interaction"][0].random.n == 200
    assert {c.basis for c in section.ablation.curves} == {"interaction", "pca", "standard", "random"}
    llc = report.llc
    assert llc is not None and llc.config.eps == (1e-3,) and list(llc.parts) == ["model"]
    assert llc.parts["model"].kfac_nominal == 1048576
    assert len(table_rows(llc)) == 1
