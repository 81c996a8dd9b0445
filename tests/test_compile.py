"""torch.compile: the training forwards trace as one graph each (no host sync, no graph break), for
the default sizes and every Table 4 switch; ``train_*.compile`` is tested in the stage tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo as dynamo

from spectralar.bench import _model_configs
from spectralar.models.generator import SpectralGPT
from spectralar.models.tokenizer import NestedSpectralTokenizer
from spectralar.stages.train_generator import TeacherForced
from tests.conftest import REPO


def _breaks(module: torch.nn.Module, *inputs: torch.Tensor) -> list[str]:
    dynamo.reset()
    explained = dynamo.explain(module)(*inputs)
    assert explained.graph_count >= 1
    return [f"{reason.reason} at {reason.user_stack[-1] if reason.user_stack else '?'}"
            for reason in explained.break_reasons]


@pytest.mark.parametrize("causal_mask,band_limited", [(True, True), (False, False)])
def test_the_tokenizer_forward_has_no_graph_break(causal_mask, band_limited):
    torch.manual_seed(0)
    cfg = dataclasses.replace(_model_configs(REPO / "params.yaml")[0], causal_mask=causal_mask,
                              band_limited_output=band_limited)
    model = NestedSpectralTokenizer(cfg)
    x = torch.rand(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    prefix = torch.tensor([1, cfg.num_tokens // 2, cfg.num_tokens])
    assert _breaks(model, x, prefix) == []


def test_a_bad_prefix_length_still_fails_in_eager_mode():
    cfg = _model_configs(REPO / "params.yaml")[0]
    model = NestedSpectralTokenizer(cfg)
    x = torch.rand(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    with pytest.raises(ValueError, match=rf"prefix_lengths must lie in \[0, {cfg.num_tokens}\], got range \[1, 99\]"):
        model(x, torch.tensor([1, 99]))


def test_the_generator_training_forward_has_no_graph_break():
    torch.manual_seed(0)
    cfg = _model_configs(REPO / "params.yaml")[1]
    model = TeacherForced(SpectralGPT(cfg))
    ids = torch.randint(0, cfg.vocab_size, (4, cfg.num_tokens))
    labels = torch.tensor([0, 1, 2, cfg.num_classes])  # the last: the null class (CFG)
    assert _breaks(model, ids, labels) == []


def test_a_compiled_forward_equals_the_eager_one():
    """What ``train_*.compile`` runs computes what eager mode computes (aot_eager: the captured graph
    through AOTAutograd, without inductor's code generation)."""
    torch.manual_seed(0)
    cfg = _model_configs(REPO / "params.yaml")[0]
    model = NestedSpectralTokenizer(cfg)
    x = torch.rand(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    prefix = torch.tensor([1, 5, cfg.num_tokens])
    dynamo.reset()
    eager = model(x, prefix)
    traced = torch.compile(model, backend="aot_eager")(x, prefix)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
