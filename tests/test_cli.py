"""The command line: clear failures without the hub; local data through `datasets`."""
import pytest

from tl_degeneracy.cli import main
from tl_degeneracy.loading import hub_reachable

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
    from tl_degeneracy.cli.common import UsageError, load_text_dataset

    with pytest.raises(UsageError, match="local text/JSON/parquet"):
        load_text_dataset("surely/not-a-local-path")


def test_local_text_file_through_datasets(tmp_path):
    """A local .txt file goes through `datasets` and the model's tokenizer into collect."""
    import tl_degeneracy as tld
    from tl_degeneracy.cli.common import load_text_dataset
    from tl_degeneracy.default_model import load_default_model

    text = tmp_path / "book.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.\n" * 40)
    data = load_text_dataset(str(text))
    assert "text" in data.column_names
    stats = tld.collect(load_default_model(), data, "blocks.0.hook_resid_pre", context=32, batch_size=4,
                        max_tokens=256, progress=False)
    assert stats.n_tokens == 256 and stats.gram("blocks.0.hook_resid_pre").shape == (128, 128)
