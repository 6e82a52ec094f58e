"""Chunked cross-entropy equals F.cross_entropy in value and gradient, whatever the chunking."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdomain.chunked_loss import chunk_rows, chunked_cross_entropy


def _softcap(x):
    return torch.tanh(x / 3.0) * 3.0


class _LoraLikeHead(nn.Module):
    """Not an nn.Linear (as a peft-wrapped head is not): the generic path, with two trained matrices."""

    def __init__(self, dim, vocab):
        super().__init__()
        self.base = nn.Linear(dim, vocab, bias=False).requires_grad_(False)
        self.a, self.b = nn.Linear(dim, 4, bias=False), nn.Linear(4, vocab, bias=False)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def _reference_and_chunked(head, transform, n, rows, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    head = head.to(dtype)
    hidden = torch.randn(n, 24, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 97, (n,))
    trained = [hidden, *(p for p in head.parameters() if p.requires_grad)]
    ref = F.cross_entropy((transform or (lambda x: x))(head(hidden)).float(), targets, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.37, trained)  # a scale after the loss, as loss_sum / supervised is
    out = chunked_cross_entropy(hidden, targets, head, transform, rows=rows)
    out_grads = torch.autograd.grad(out * 0.37, trained)
    return ref, out, ref_grads, out_grads


@pytest.mark.parametrize("rows", [1, 3, 7, 64])
@pytest.mark.parametrize("head_kind", ["linear", "linear_bias", "softcap", "lora_like"])
def test_equals_cross_entropy_value_and_gradient(rows, head_kind):
    head = {"linear": lambda: nn.Linear(24, 97, bias=False), "linear_bias": lambda: nn.Linear(24, 97),
            "softcap": lambda: nn.Linear(24, 97, bias=False), "lora_like": lambda: _LoraLikeHead(24, 97)}[head_kind]()
    transform = _softcap if head_kind == "softcap" else None
    ref, out, ref_grads, out_grads = _reference_and_chunked(head, transform, n=23, rows=rows)  # 23 rows: chunks do not divide it
    assert abs(out.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert len(out_grads) == len(ref_grads) >= 2
    for a, b in zip(out_grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_kind", ["linear", "lora_like"])
def test_empty_supervised_set_gives_zero_loss_and_zero_gradients(head_kind):
    head = nn.Linear(24, 97) if head_kind == "linear" else _LoraLikeHead(24, 97)
    ref, out, ref_grads, out_grads = _reference_and_chunked(head, None, n=0, rows=5)
    assert out.item() == ref.item() == 0.0 and out.requires_grad
    for a, b in zip(out_grads, ref_grads):
        assert a.shape == b.shape and not a.any() and not b.any()


def test_frozen_head_and_no_grad_compute_no_gradient():
    head = nn.Linear(24, 97).requires_grad_(False)
    hidden, targets = torch.randn(9, 24, requires_grad=True), torch.randint(0, 97, (9,))
    ref = F.cross_entropy(head(hidden), targets, reduction="sum")
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, targets, head, rows=4)
    assert not loss.requires_grad and torch.allclose(loss, ref)
    (grad,) = torch.autograd.grad(chunked_cross_entropy(hidden, targets, head, rows=4), [hidden])
    assert torch.allclose(grad, torch.autograd.grad(ref, [hidden])[0], atol=1e-6)


def test_bf16_head_matches_its_own_plain_loss():
    """Under reduced precision the chunks compute what the plain path computes: bf16 logits, then fp32 softmax."""
    ref, out, ref_grads, out_grads = _reference_and_chunked(nn.Linear(24, 97, bias=False), None, n=11, rows=4, dtype=torch.bfloat16)
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) <= 1e-3 * abs(ref.item())
    for a, b in zip(out_grads, ref_grads):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_chunk_rows_bounds_a_chunk_by_memory_with_a_floor():
    assert chunk_rows(32_000) * 32_000 * 4 <= 32 * 2**20 < (chunk_rows(32_000) + 1) * 32_000 * 4
    assert chunk_rows(151_936) == chunk_rows(10**9) == 256  # thin chunks would re-read the head weight too often
