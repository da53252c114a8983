"""The BERT encoder: equal to transformers' BertModel on the same weights, padding-invariant, configs validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lamina.arch import Bert, BertConfig, build_model, config_from_dict
from lamina.errors import ConfigError, ModelFormatError

TINY = dict(vocab_size=99, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_positions=40, type_vocab_size=2)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows of 17 tokens: one full, two right-padded (10 and 3 real tokens), mixed segment ids."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (3, 17), generator=g)
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 10:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    token_types = torch.randint(0, 2, (3, 17), generator=g) * mask
    return ids, mask, token_types


@pytest.fixture(scope="module")
def hf_bert():  # type: ignore[no-untyped-def]
    """A tiny transformers BertModel with every parameter random (LayerNorms too, so they are tested)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12,
    )
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


@pytest.mark.peer
def test_last_hidden_states_equal_transformers_with_padding(hf_bert) -> None:  # type: ignore[no-untyped-def]
    state = hf_bert.state_dict()
    assert any(k.startswith("pooler.") for k in state)  # dropped by build_model, not by us
    model = build_model(BertConfig(**TINY), state).eval()
    ids, mask, token_types = _batch()
    with torch.no_grad():
        ref = hf_bert(input_ids=ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state
        out = model(ids, mask, token_types)  # (B, T, C)
    assert out.shape == (3, 17, 64)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    # No token types means one segment (all zeros), as in transformers.
    with torch.no_grad():
        ref0 = hf_bert(input_ids=ids, attention_mask=mask).last_hidden_state
        out0 = model(ids, mask)
    torch.testing.assert_close(out0[real], ref0[real], atol=1e-5, rtol=1e-5)


@pytest.mark.peer
def test_build_model_accepts_hf_checkpoint_names(hf_bert) -> None:  # type: ignore[no-untyped-def]
    """Every BertModel tensor but the pooler maps one to one; a missing one is a clear error."""
    state = dict(hf_bert.state_dict())
    state["embeddings.position_ids"] = torch.arange(40)[None]  # what older transformers saved
    model = build_model(BertConfig(**TINY), state, dtype=torch.float64)
    ours = set(model.state_dict())
    assert ours == {k for k in state if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    assert model.encoder.layer[1].attention.output.LayerNorm.weight.dtype == torch.float64
    del state["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ModelFormatError, match=r"encoder\.layer\.1\.output\.dense\.weight"):
        build_model(BertConfig(**TINY), state)


def test_padding_does_not_change_real_tokens() -> None:
    """A sequence alone and the same sequence right-padded in a batch give the same hidden states."""
    torch.manual_seed(0)
    model = build_model(BertConfig(**TINY)).eval()
    ids, mask, token_types = _batch()
    with torch.no_grad():
        batched = model(ids, mask, token_types)
        for row, n in enumerate(mask.sum(dim=1).tolist()):
            alone = model(ids[row : row + 1, :n], torch.ones(1, n, dtype=torch.long), token_types[row : row + 1, :n])
            torch.testing.assert_close(batched[row, :n], alone[0], atol=1e-5, rtol=1e-5)
        # An all-ones mask takes the unmasked attention path; it must agree with no mask at all.
        full = torch.ones_like(mask)
        torch.testing.assert_close(model(ids, full), model(ids), atol=0, rtol=0)
        # A row with no real token must not poison the batch with NaNs.
        empty = mask.clone()
        empty[2] = 0
        assert torch.isfinite(model(ids, empty)).all()


def test_random_init_and_too_long_input() -> None:
    model = build_model(BertConfig(**TINY))
    assert isinstance(model, Bert)
    ln = model.encoder.layer[0].output.LayerNorm
    assert torch.equal(ln.weight, torch.ones(64)) and torch.equal(ln.bias, torch.zeros(64))
    assert torch.equal(model.embeddings.word_embeddings.weight[0], torch.zeros(64))  # the padding row
    assert 0.015 < model.encoder.layer[0].intermediate.dense.weight.std().item() < 0.025
    with pytest.raises(ValueError, match="exceeds max_positions 40"):
        model(torch.zeros(1, 41, dtype=torch.long))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"dim": 65}, "divisible by n_heads"),
        ({"n_layers": 0}, "n_layers must be >= 1"),
        ({"max_positions": 0}, "max_positions must be >= 1"),
        ({"type_vocab_size": 0}, "type_vocab_size must be >= 1"),
        ({"pad_token_id": 99}, "pad_token_id must be in"),
        ({"norm_eps": 0.0}, "norm_eps must be > 0"),
        ({"family": "llama"}, "family must be 'bert'"),
    ],
)
def test_config_validation(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BertConfig(**{**TINY, **override})


def test_config_yaml_round_trip(tmp_path: Path) -> None:
    config = BertConfig(**TINY, norm_eps=1e-7, pad_token_id=3)
    path = tmp_path / "bert.yaml"
    path.write_text(config.to_yaml())
    assert BertConfig.from_yaml(path) == config
    assert config_from_dict(config.to_dict()) == config  # the family key picks BertConfig
    assert config.head_dim == 16 and config.max_seq_len == 40
    with pytest.raises(ConfigError, match="unknown BertConfig keys"):
        BertConfig.from_dict({**TINY, "hidden_size": 64})
