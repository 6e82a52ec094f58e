"""Measure one real training step's peak memory on CPU, in a process of its own (run as a script by tests/test_plan.py).

    python -m tests.plan_memory RECIPE.yaml SEQ_WORDS BATCH

Prints JSON: the model's weight bytes and the peak resident memory of two steps (the second runs with the optimizer
state the first creates) above the resident memory before them: the step's peak beside the weights. glibc is told (MALLOC_MMAP_THRESHOLD_, set by the caller) to map every large block
on its own, so freed activations leave the process at once and the peak RSS follows the live tensors."""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(recipe_path: str, words: int, batch: int) -> dict:
    import torch

    from mmdomain.builder import build_model
    from mmdomain.recipe import load_recipe
    from mmdomain.trainability import apply_trainable, param_groups

    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = load_recipe(recipe_path)
    model, proc = build_model(recipe.model)
    apply_trainable(model, recipe.trainable)
    model.train()
    size = model.encoder.info.input_size
    g = torch.Generator().manual_seed(1)
    vocab = [w for w in proc.tokenizer.get_vocab() if w.startswith("w")][:500]
    samples = []
    for i in range(batch):
        caption = " ".join(vocab[int(j)] for j in torch.randint(0, len(vocab), (words,), generator=g))
        samples.append(proc([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": caption}],
                            [torch.rand(3, *size, generator=g)], key=str(i)))
    inputs = proc.collate(samples)
    optimizer = torch.optim.AdamW(param_groups(model, recipe.lr, recipe.optim.lr, 0.0), foreach=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    supervised = int((inputs["labels"][:, 1:] != -100).sum())

    def step() -> None:
        out = model(**inputs)
        (out.loss_sum / supervised).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    gc.collect()
    before = _kib("VmRSS")
    step()  # creates the optimizer state (at its end) and the math libraries' one-time buffers
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    resident = _kib("VmRSS")
    step()  # a step as every later one runs: with the optimizer state
    peak = (_kib("VmHWM") - before) * 1024
    step_only = (_kib("VmHWM") - resident) * 1024
    moments = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if t.dim() > 0)
    return {"weights_bytes": weights, "optimizer_bytes": moments, "step_peak_bytes": peak, "second_step_bytes": step_only, "after_first_bytes": (resident - before) * 1024, "seq_len": int(inputs["input_ids"].shape[1]),
            "supervised_per_sample": supervised / batch}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
