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


def test_train_with_compile_reports_the_compiling_step_on_its_own(tiny_llm_dir, tmp_path, monkeypatch):
    """The training loop's side of optim.compile, with torch.compile stood in for (the slow test above runs the real
    one): the parts are compiled once, the first step is a 'compile' event and stays out of samples/s."""
    import json

    from mmdomain import compiled_step
    from mmdomain.cli import main
    from mmdomain.train import train

    from .conftest import write_side_task
    from .test_train import _recipe

    compiled = []
    monkeypatch.setattr(compiled_step.torch, "compile", lambda module, **kw: compiled.append(module) or module)
    (tmp_path / "task").mkdir()
    write_side_task(tmp_path / "task", n=16)
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "task" / "samples.jsonl"), "--media", str(tmp_path / "task" / "media"),
                 "--out", str(tmp_path / "s")]) == 0
    recipe = _recipe(tiny_llm_dir, str(tmp_path / "s" / "*.tar"), tmp_path / "run", optim__max_steps=3, optim__compile=True,
                     data__eval=None, log_every=1)
    train(recipe)
    assert len(compiled) == 3  # decoder, encoder, connector
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [line for line in lines if line.get("event") == "compile"]
    assert [e["step"] for e in events] == [1] and events[0]["seconds"] > 0
    steps = {line["step"]: line for line in lines if "loss" in line}
    assert steps[1]["samples_per_s"] is None and steps[2]["samples_per_s"] > 0 and steps[3]["samples_per_s"] > 0
