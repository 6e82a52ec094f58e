"""MultimodalLM: each media kind's encoder -> connector -> tokens spliced at placeholder ids -> causal LM, with a
supervised-only loss. Building, saving and loading live in ``builder``; this module only runs the model."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from encoders import encode_slices

from .chunked_loss import chunked_cross_entropy
from .media import MediaBatch
from .processor import IGNORE
from .spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class MultimodalOutput:
    loss: torch.Tensor | None
    """Mean cross-entropy over supervised tokens (HF's causal-LM loss), or None without labels."""
    loss_sum: torch.Tensor | None
    """Summed cross-entropy, for exact token-weighted gradient accumulation across micro-batches."""
    num_supervised: int
    logits: torch.Tensor | None
    """``[B, T, V]`` when asked for (``return_logits=True`` or no labels), else None: training never builds it."""


class MediaKindModule(nn.Module):
    """The encoder + connector of one further media kind (``ModelSpec.extra_kinds``) and its placeholder id."""

    def __init__(self, encoder: nn.Module, connector: nn.Module, token_id: int) -> None:
        super().__init__()
        self.encoder, self.connector, self.token_id = encoder, connector, token_id

    @property
    def tokens_per_item(self) -> int:
        return self.connector.num_output_tokens(self.encoder.info.num_tokens())


class MultimodalLM(nn.Module):
    """Joins each media kind's encoder and connector to a (possibly LoRA-wrapped) causal LM.

    Media tokens are written into ``input_ids`` by the processor; ``embed`` only scatters connector outputs into
    those positions, in order, one masked scatter per kind, after checking that the counts agree. The primary kind's
    parts are ``encoder`` and ``connector``; further kinds are ``extra_kinds[i]`` (parameter names say so).
    """

    def __init__(self, encoder: nn.Module, connector: nn.Module, llm: nn.Module, *, media_token_id: int, spec: ModelSpec,
                 extra_kinds: Sequence[MediaKindModule] = ()) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
        self.extra_kinds = nn.ModuleList(extra_kinds)
        self.media_token_id = media_token_id
        self.spec = spec
        self.restored: set[str] = set()  # parameter names loaded from a checkpoint: saved again by save_pretrained
        self.compiled: dict[int, Any] = {}  # id(part) -> its torch.compile'd callable, used in training (compiled_step)

    # -- parts --------------------------------------------------------------------------------------------------

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers ``*ForCausalLM`` (under the peft wrapper when LoRA is on; LoRA layers live inside it)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def tokens_per_item(self) -> int:
        return self.connector.num_output_tokens(self.encoder.info.num_tokens())

    def _run(self, part: nn.Module) -> Any:
        """``part`` or, in training with ``optim.compile``, its compiled callable (same parameters)."""
        return self.compiled.get(id(part), part) if self.training else part

    def kind_parts(self) -> list[tuple[nn.Module, nn.Module, int]]:
        """(encoder, connector, placeholder id) of every media kind, the primary one first."""
        return [(self.encoder, self.connector, self.media_token_id), *((k.encoder, k.connector, k.token_id) for k in self.extra_kinds)]

    def train(self, mode: bool = True) -> "MultimodalLM":
        """Training mode for what trains; a frozen encoder stays in eval mode, so it gives the same features in
        training as in evaluation (no dropout or SpecAugment masking, no BatchNorm statistics drifting, which no
        checkpoint would save)."""
        super().train(mode)
        for encoder, _, _ in self.kind_parts():
            if not any(p.requires_grad for p in encoder.parameters()):
                encoder.eval()
            elif mode:
                # Partly trained (last blocks, LoRA, norms): each frozen piece (the patch embedding, the earlier blocks)
                # stays in eval mode for the same reason.
                for module in encoder.modules():
                    weights = list(module.parameters())
                    if weights and not any(p.requires_grad for p in weights):
                        module.eval()
        return self

    def encode(self, kind: int, batch: MediaBatch) -> torch.Tensor:
        """Items of media kind ``kind`` -> ``[items, tokens_per_item, hidden]`` connector outputs (items with their own
        ``batch.tokens`` use only the first ones; ``embed`` picks them). An ``encoded``
        batch holds the encoder's output already (a feature cache) and goes straight to the connector. A volume's
        slices reach the connector as their own axis, ``[items, slices, tokens, dim]``."""
        encoder, connector, _ = self.kind_parts()[kind]
        features = batch.values
        if not batch.encoded:
            values = features.to(next(encoder.parameters()).dtype)
            # Volumes [n, slices, C, H, W] go through the 2-D encoder slice by slice; encoders that can mask padding
            # (wav2vec2 with layer-norm features) are told where each clip ends.
            features = encode_slices(self._run(encoder), values, batch.lengths)
        return self._run(connector)(features.to(next(connector.parameters()).dtype))

    def embed(self, input_ids: torch.Tensor, media: Sequence[MediaBatch | None] | None = None) -> torch.Tensor:
        """Token embeddings with each media kind's connector outputs scattered at its placeholder positions."""
        embeds = self.causal_lm.get_input_embeddings()(input_ids)
        parts = self.kind_parts()
        media = list(media or [])
        if len(media) > len(parts):
            raise ValueError(f"{len(media)} media kinds given; this model takes {len(parts)}")
        media += [None] * (len(parts) - len(media))
        for kind, ((_, _, token_id), batch) in enumerate(zip(parts, media)):
            slots = input_ids == token_id
            n_slots = int(slots.sum())
            if batch is None or len(batch) == 0:
                if n_slots:
                    raise ValueError(f"input_ids hold {n_slots} placeholder tokens (id {token_id}) but no media of that kind were given")
                continue
            tokens = self.encode(kind, batch)
            if batch.tokens is not None:  # items of their own length (short clips) fill the first tokens of their block
                counts = batch.tokens.to(tokens.device)
                if int(counts.max()) > tokens.shape[1]:
                    raise ValueError(f"a media item claims {int(counts.max())} tokens; the connector gives {tokens.shape[1]} per item")
                if int(counts.sum()) != n_slots:
                    raise ValueError(f"input_ids hold {n_slots} media placeholder tokens (id {token_id}) but the {len(counts)} media items "
                                     f"fill {int(counts.sum())}; build inputs with this model's processor")
                tokens = tokens[torch.arange(tokens.shape[1], device=tokens.device)[None, :] < counts[:, None]]
            elif tokens.shape[0] * tokens.shape[1] != n_slots:
                raise ValueError(
                    f"input_ids hold {n_slots} media placeholder tokens (id {token_id}) but {tokens.shape[0]} media items x "
                    f"{tokens.shape[1]} connector tokens were given; build inputs with this model's processor so each item "
                    f"expands to {tokens.shape[1]} tokens"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), tokens.to(embeds.dtype))
        return embeds

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        media: Sequence[MediaBatch | None] | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = False,
        **_: Any,
    ) -> MultimodalOutput:
        """Loss over supervised positions only: the LM head and cross-entropy never see the other positions (on
        small LLMs the all-position ``[B, T, V]`` logits dominate the step). Same value as HF's causal-LM loss."""
        hidden = self.hidden_states(input_ids, attention_mask, media, position_ids)
        logits = self.logits(hidden) if (return_logits or labels is None) else None
        if labels is None:
            return MultimodalOutput(None, None, 0, logits)
        targets = labels[:, 1:]
        supervised = targets != IGNORE
        # Rows picked from hidden in one index (a slice, then a mask, would zero-fill two [B, T, H] gradients in backward).
        rows = torch.cat([supervised, supervised.new_zeros(len(supervised), 1)], dim=1)
        # A chunk of rows at a time: the [supervised, vocab] logits, their log-softmax and gradient never exist whole.
        transform = head_transform(self.causal_lm.config)
        loss_sum = chunked_cross_entropy(hidden[rows], targets[supervised], self.causal_lm.get_output_embeddings(),
                                         None if getattr(transform, "is_identity", False) else transform)
        count = int(supervised.sum())
        return MultimodalOutput(loss_sum / max(count, 1), loss_sum, count, logits)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      media: Sequence[MediaBatch | None] | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer hidden states ``[B, T, H]`` of the LLM over the spliced sequence (no LM head)."""
        embeds = self.embed(input_ids, media)
        return self._run(self.causal_lm.get_decoder())(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def sequence_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                          media: Sequence[MediaBatch | None] | None = None, *, mean: bool = False, **_: Any) -> torch.Tensor:
        """Log-probability of each row's supervised tokens ``[B]``, summed, or averaged per token when ``mean``
        (closed-choice scoring compares answers of different lengths, and a sum favours the shorter one)."""
        hidden = self.hidden_states(input_ids, attention_mask, media)
        targets = labels[:, 1:]
        supervised = targets != IGNORE
        logp = torch.log_softmax(self.logits(hidden[:, :-1][supervised]).float(), dim=-1)
        token_logp = logp.gather(1, targets[supervised].unsqueeze(1)).squeeze(1)
        rows = supervised.nonzero()[:, 0]
        total = torch.zeros(len(input_ids), dtype=token_logp.dtype, device=token_logp.device).index_add_(0, rows, token_logp)
        return total / supervised.sum(dim=1).clamp(min=1) if mean else total

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on ``hidden``, with the model family's own transform of its logits (see ``head_transform``)."""
        return head_transform(self.causal_lm.config)(self.causal_lm.get_output_embeddings()(hidden))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 media: Sequence[MediaBatch | None] | None = None, **generate_kwargs: Any) -> torch.Tensor:
        """New token ids ``[B, new]`` (batch with left padding). Media placeholder tokens are never generated.

        Decoding is greedy unless ``generate_kwargs`` ask otherwise. Of the LLM's own ``generation_config`` only the
        token ids are kept (where to stop, what pads): its sampling settings (Qwen ships ``do_sample``, temperature,
        top-p and a repetition penalty) would otherwise half-apply on top of greedy decoding, changing the answers
        evaluation scores and warning on every call. ``eos_token_id`` given here stops generation in addition to the
        LLM's own end tokens (a chat template's end of turn, say)."""
        embeds = self.embed(input_ids, media)
        own = self.llm.generation_config
        stops = [own.eos_token_id, generate_kwargs.pop("eos_token_id", None)]
        eos = sorted({int(t) for s in stops if s is not None for t in (s if isinstance(s, (list, tuple)) else [s])})
        # Every setting goes in as a keyword: transformers (4.50+ and 5) fills the fields of a passed GenerationConfig
        # that are left at their defaults from the LLM's own config, while keywords override it, on every version.
        settings = {**neutral_generation_settings(), "eos_token_id": eos or None,
                    "suppress_tokens": [token_id for _, _, token_id in self.kind_parts()], **generate_kwargs}
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **settings)


# Greedy decoding with nothing that changes the argmax: the values transformers uses when a model's config says
# nothing. Sampling knobs are listed too, so the LLM's temperature or top-p does not reach its config's validation
# (which warns when they are set without sampling).
_NEUTRAL_GENERATION = {
    "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
    "min_p": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "begin_suppress_tokens": None,
}


def neutral_generation_settings() -> dict[str, Any]:
    """The neutral generation settings this transformers version knows (unknown keywords would reach the model)."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    return {k: v for k, v in _NEUTRAL_GENERATION.items() if hasattr(known, k)}


def head_transform(config: Any) -> Any:
    """What a model family does to the LM head's output before its softmax, read from its config.

    ``MultimodalLM`` applies the head itself (only at supervised positions), so it must repeat these: Gemma-2/3/4
    cap logits (``final_logit_softcapping``), Cohere scales them (``logit_scale``), Granite divides by
    ``logits_scaling`` and HyperCLOVA X multiplies by it. ``builder.check_head`` compares the result with the LLM's
    own forward when a model is built, so a family with another transform is refused rather than trained wrongly.
    """
    model_type = str(getattr(config, "model_type", ""))
    steps = []
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    scale = getattr(config, "logit_scale", None)
    if model_type.startswith("cohere") and scale:
        steps.append(lambda x: x * scale)
    scaling = getattr(config, "logits_scaling", None)
    if scaling and model_type.startswith("granite"):
        steps.append(lambda x: x / scaling)
    elif scaling and model_type.startswith("hyperclovax"):
        steps.append(lambda x: x * scaling)

    def apply(logits: torch.Tensor) -> torch.Tensor:
        for step in steps:
            logits = step(logits)
        return logits

    apply.is_identity = not steps  # type: ignore[attr-defined]
    return apply
