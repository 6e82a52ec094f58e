"""Connectors: registry behaviour, inferred dims, token counts reported for token-changing connectors."""
from __future__ import annotations

import pytest
import torch

from connectors import Connector, create_connector, list_connectors, register_connector


@pytest.mark.parametrize("name,opts,n_in,n_out", [("linear", {}, 64, 64), ("mlp", {"depth": 3}, 64, 64), ("pixel_shuffle", {"factor": 2}, 64, 16),
                                                  ("depth_pool", {}, 64, 64)])
def test_connectors_map_tokens_and_report_counts(name, opts, n_in, n_out):
    c = create_connector(name, in_dim=24, out_dim=40, **opts)
    assert isinstance(c, Connector)
    out = c(torch.randn(3, n_in, 24))
    assert out.shape == (3, n_out, 40) and c.num_output_tokens(n_in) == n_out


def test_mlp2x_gelu_structure():
    c = create_connector("mlp", in_dim=8, out_dim=16, depth=2)
    kinds = [type(m).__name__ for m in c.layers]
    assert kinds == ["Linear", "GELU", "Linear"]
    assert c.layers[0].weight.shape == (16, 8) and c.layers[2].weight.shape == (16, 16)


def test_registry_errors():
    with pytest.raises(KeyError, match="Did you mean 'mlp'"):
        create_connector("mpl", in_dim=2, out_dim=2)
    with pytest.raises(ValueError, match="already registered"):
        register_connector("mlp")(object)
    with pytest.raises(ValueError, match="square token grid"):
        create_connector("pixel_shuffle", in_dim=4, out_dim=4).num_output_tokens(65)
    assert {"linear", "mlp", "pixel_shuffle"} <= set(list_connectors())


def test_spec_refuses_written_dims():
    from mmdomain.spec import ConnectorSpec

    with pytest.raises(ValueError, match="inferred"):
        ConnectorSpec(name="mlp", options={"in_dim": 3})
