"""The command line: clear failures without the hub; local data through `datasets`."""
import pytest

from tl_degeneracy.cli import main
from tl_degeneracy.generations import hub_reachable

pytestmark = pytest.mark.models


@pytest.mark.skipif(hub_reachable(timeout=1.0), reason="the hub is reachable here: nothing to test")
def test_pretrained_name_without_hub_fails_clearly(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code = main(["analyze", "gpt2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Hugging Face hub" in err and "embedded default model" in err and "Traceback" not in err


@pytest.mark.skipif(hub_reachable(timeout=1.0), reason="the hub is reachable here: nothing to test")
def test_dataset_name_without_hub_fails_clearly(tmp_path):
    from tl_degeneracy.cli import load_text_dataset

    with pytest.raises(SystemExit, match="local text/JSON/parquet"):
        load_text_dataset("surely/not-a-local-path")
