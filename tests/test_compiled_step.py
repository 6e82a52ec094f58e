"""optim.compile: a compiled training step computes the eager step's loss and gradients; names and eval stay eager."""
from __future__ import annotations

import pytest
import torch

from mmdomain.builder import build_model
from mmdomain.compiled_step import CompileWatch, compile_model
from mmdomain.spec import ModelSpec

from .test_model import _conversations


@pytest.mark.slow
def test_compiled_step_gives_the_eager_loss_and_gradients(tiny_llm_dir):
    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32}},
                                     "connector": {"name": "mlp"}, "llm": {"path": tiny_llm_dir}})
    model, proc = build_model(spec)
    model.train()
    batch = proc.collate([proc(c, key=str(i)) for i, c in enumerate(_conversations(3))])
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = list(model.state_dict())

    def step():
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, [p for _, p in trained])
        return loss.item(), grads

    eager_loss, eager_grads = step()
    graphs = CompileWatch.graphs()
    assert set(compile_model(model)) == {"decoder", "encoder[0]", "connector[0]"}
    compiled_loss, compiled_grads = step()
    assert CompileWatch.graphs() > graphs  # it really ran compiled graphs, not the eager modules
    assert abs(compiled_loss - eager_loss) <= 1e-5
    for (name, _), a, b in zip(trained, compiled_grads, eager_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    assert list(model.state_dict()) == names  # checkpoints keep the eager names
    model.eval()  # evaluation runs the eager modules: no graph is built for it
    before = CompileWatch.graphs()
    with torch.no_grad():
        assert abs(model(**batch).loss.item() - eager_loss) <= 1e-5
    assert CompileWatch.graphs() == before
