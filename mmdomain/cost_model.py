"""The analytic cost of a transformer stack: matmul FLOPs and the activation memory autograd keeps, per layer.

FLOPs (shared with ``benchmarks/gemm_peak.py``): a layer's forward costs ``2 * matmul_params`` per token (every
weight of its linear layers is one multiply-add per token) plus ``4 * seq * attn_width`` per token for the attention
scores and their product with the values (counted over the full square, as the benchmarks count it). A backward
pass costs one forward for the input gradients (whenever anything before the stack trains) plus one forward for
the weight gradients (when the stack's own weights train); LoRA adapters' weight gradients are negligible.

Activations: what autograd saves for the backward pass of one layer, in elements per token, from the operations a
pre-norm transformer layer runs (attention block, then MLP block, each behind a norm and a residual):

    frozen layer on the gradient path (its input gradient is needed: stage 1 behind a trained connector)
        norm inputs 2d; q d, k and v 2*kv (kept by the attention kernel); attention output d;
        MLP: gated (SwiGLU) gate f + up f + act(gate) f, plain (GELU) fc1 output f           -> 5d + 2kv + 3f | 5d + 2kv + f
    trained layer (its weight gradients too: every linear keeps its input)
        + norm outputs 2d, the normalised values the norm weights need 2d, o-proj input d,
          down-proj input f (plain MLP: fc2 input f)                                          -> + 5d + f
    LoRA-adapted frozen layer: frozen + the inputs of the adapted linears (norm outputs 2d, o-proj input d,
        down-proj input f), + a dropout copy of each adapted linear's input when lora dropout > 0
    eager attention also keeps the softmax probabilities (heads * seq per token); fused kernels (SDPA, flash)
        keep only a log-sum-exp per head.
    gradient checkpointing keeps only each layer's input (d per token) and recomputes one layer at a time in the
        backward pass, so one layer's full set is alive on top.

A frozen stack that no gradient passes through (a frozen encoder) keeps nothing; its peak is one layer's working
set. These counts are the model; ``tests/test_plan.py`` holds them to a measured training step.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stack:
    """A stack of identical transformer layers as the cost model sees it."""

    layers: int
    width: int
    """d: the residual width."""
    attn_width: int
    """heads * head_dim: the width of q and of the attention output."""
    kv_width: int
    """kv_heads * head_dim (== attn_width without grouped-query attention)."""
    ffn: int
    """f: the MLP's hidden width."""
    gated: bool
    """SwiGLU-style MLP (gate and up projections) rather than one fc1 -> activation -> fc2."""
    heads: int
    matmul_params: int
    """Weights of the linear layers of one layer (what each token multiplies through)."""


def forward_flops(stack: Stack, tokens: int, seq: int) -> float:
    """Matmul FLOPs of one forward pass of ``tokens`` tokens in sequences of ``seq``."""
    return float(stack.layers * tokens * (2 * stack.matmul_params + 4 * seq * stack.attn_width))


def step_flops(stack: Stack, tokens: int, seq: int, *, input_grads: bool, weight_grads: bool, recompute: bool = False) -> float:
    """Forward + backward FLOPs: the backward costs a forward per kind of gradient it computes; gradient
    checkpointing runs the forward once more."""
    forward = forward_flops(stack, tokens, seq)
    passes = 1 + int(input_grads or weight_grads) + int(weight_grads) + int(recompute and (input_grads or weight_grads))
    return forward * passes


def head_flops(positions: int, width: int, vocab: int, *, trains: bool) -> float:
    """The LM head at ``positions`` positions: forward, input gradient, and the weight gradient when it trains."""
    return 2.0 * positions * width * vocab * (3 if trains else 2)


def saved_per_token(stack: Stack, mode: str, *, lora_inputs: bool = False, lora_dropout: bool = False) -> int:
    """Elements autograd keeps per token per layer (see the module docstring). ``mode``: ``trained`` (weights
    train), ``path`` (frozen, but gradients flow through it), ``none`` (no gradient reaches it)."""
    if mode == "none":
        return 0
    d, f = stack.width, stack.ffn
    mlp = 3 * f if stack.gated else f
    kept = 2 * d + stack.attn_width + 2 * stack.kv_width + stack.attn_width + mlp
    if mode == "trained" or lora_inputs:
        kept += 2 * d + stack.attn_width + f  # inputs of the linears: norm outputs (q/k/v, gate/up), o-proj, down-proj
    if mode == "trained":
        kept += 2 * d  # the normalised values the norm weights' gradients need
    if lora_dropout:
        kept += 4 * d + stack.attn_width + f if stack.gated else 3 * d + stack.attn_width + f  # one copy per adapted linear's input
    return kept


def activation_bytes(stack: Stack, mode: str, *, tokens: int, seq: int, element_bytes: int, eager_attention: bool,
                     checkpointing: bool, lora_inputs: bool = False, lora_dropout: bool = False) -> float:
    """Bytes one forward pass leaves for the backward pass (``tokens`` tokens in sequences of ``seq``); with
    gradient checkpointing, the layer inputs plus the one layer recomputed at a time."""
    if mode == "none":
        return float(layer_working_set(stack, tokens=tokens, seq=seq, element_bytes=element_bytes, eager_attention=eager_attention))
    per_layer = saved_per_token(stack, mode, lora_inputs=lora_inputs, lora_dropout=lora_dropout) * tokens * element_bytes
    if eager_attention:
        per_layer += stack.heads * seq * tokens * element_bytes
    if checkpointing:
        return float(stack.layers * stack.width * tokens * element_bytes + per_layer)
    return float(stack.layers * per_layer)


def layer_working_set(stack: Stack, *, tokens: int, seq: int, element_bytes: int, eager_attention: bool) -> int:
    """Bytes alive at once inside one layer's forward when nothing is kept for a backward pass."""
    widest = (3 if stack.gated else 2) * stack.ffn + 2 * stack.width
    scores = stack.heads * seq * tokens if eager_attention else 0
    return (widest * tokens + scores) * element_bytes
