"""The README's Python snippets run as written: every ```python block, in order, in one fresh process (one
namespace, as a reader pasting them into a session), in an empty working folder."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_snippets():
    blocks = snippets()
    assert len(blocks) >= 5
    assert any("tld.collect(" in b for b in blocks) and any("estimate_neff" in b for b in blocks)


@pytest.mark.slow  # ~80 s; run under TL 4.x only (the embedded model loads on both generations elsewhere)
def test_readme_snippets_run_as_written(tmp_path):
    program = "import torch\ntorch.set_num_threads(2)\n" + "\n".join(
        f"print('--- snippet {i}', flush=True)\n{block}" for i, block in enumerate(snippets()))
    (tmp_path / "readme_snippets.py").write_text(program, encoding="utf-8")
    result = subprocess.run([sys.executable, "readme_snippets.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    assert result.stdout.count("--- snippet") == len(snippets())
