"""The embedded default model: loads offline in the installed TL generation, is really trained."""
from __future__ import annotations

import math

import pytest
import torch

from tl_degeneracy.default_model import (
    default_model_config,
    default_state_dict,
    default_text_dataset,
    default_texts,
    default_tl_config,
    default_tokenizer,
    load_default_model,
)
from tl_degeneracy.generations import installed_generation, model_from_tl_state_dict

# The shipped text is the held-out novel; the recorded validation loss on it is ~4.5 nats/token
# (see config.json). Uniform guessing over the 2048 tokens costs log(2048) = 7.62.
LOSS_BOUND = 5.5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_default_model()


def test_config_and_files_agree():
    conf = default_model_config()
    cfg = default_tl_config()
    sd = default_state_dict()
    assert sd["embed.W_E"].shape == (cfg["d_vocab"], cfg["d_model"])
    assert sd["pos_embed.W_pos"].shape == (cfg["n_ctx"], cfg["d_model"])
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sum(v.numel() for v in sd.values()) == conf["parameters"]
    assert len(default_tokenizer()) == cfg["d_vocab"]
    losses = conf["loss_nats_per_token"]
    assert losses["validation"] < LOSS_BOUND < math.log(cfg["d_vocab"])


def test_tokenizer_round_trip():
    tok = default_tokenizer()
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.\n\nÉmile — naïve café 123!")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 0 not in ids and max(ids) < len(tok)
    assert tok.decode(ids) == text
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 0
    assert len(ids) < len(text) / 2  # BPE merges, not bytes


def test_default_text_dataset():
    ds = default_text_dataset()
    assert ds.column_names == ["text"]
    assert len(ds) == len(default_texts()) >= 20
    assert ds[0]["text"].startswith("Persuasion")
    assert sum(len(t) for t in ds["text"]) > 400_000


@pytest.mark.models
def test_loads_in_installed_generation_with_tokenizer(model):
    expected = "HookedTransformer" if installed_generation() == 3 else "TransformerBridge"
    assert type(model).__name__ == expected
    assert model.tokenizer is not None
    toks = model.to_tokens("Anne Elliot walked to Kellynch.")
    assert toks[0, 0].item() == 0  # BOS prepended once
    assert toks[0, 1].item() != 0
    assert model.to_string(toks[0, 1:]) == "Anne Elliot walked to Kellynch."
    str_toks = model.to_str_tokens("Captain Wentworth")
    assert "".join(str_toks[1:]) == "Captain Wentworth"


@pytest.mark.models
def test_same_logits_as_model_from_tl_state_dict(model):
    other = model_from_tl_state_dict(default_tl_config(), default_state_dict())
    tokens = torch.randint(1, default_tl_config()["d_vocab"], (2, 40), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), other(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.models
def test_trained_loss_on_shipped_text(model):
    """Rows as the collectors build them (tokenize_and_concatenate); loss far below uniform."""
    from tl_degeneracy.data import iter_batches

    batch = next(iter_batches(default_text_dataset(), model, batch_size=4, context=128))
    assert batch.tokens.shape == (4, 128)
    assert (batch.tokens[:, 0] == 0).all()
    with torch.no_grad():
        loss = model(batch.tokens, return_type="loss")
    assert float(loss) < LOSS_BOUND, float(loss)
