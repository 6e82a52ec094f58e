"""MultimodalLM: encoder -> connector -> tokens spliced at placeholder ids -> causal LM, with a supervised-only loss."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from connectors import create_connector
from encoders import audio_transform, create_encoder, image_transform

from .domains import build_domain
from .llm import add_media_token, apply_lora, load_llm
from .processor import IGNORE, MediaKind, MultimodalProcessor
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


class MediaBranch(nn.Module):
    """Encoder + connector of one further media kind (``ModelSpec.extra_media``)."""

    def __init__(self, encoder: nn.Module, connector: nn.Module, token_id: int) -> None:
        super().__init__()
        self.encoder, self.connector, self.token_id = encoder, connector, token_id

    @property
    def tokens_per_item(self) -> int:
        return self.connector.num_output_tokens(self.encoder.info.num_tokens())


class MultimodalLM(nn.Module):
    """Joins an encoder, a connector and a (possibly LoRA-wrapped) causal LM.

    Media tokens are written into ``input_ids`` by the processor; ``embed`` only scatters connector outputs into
    those positions, in order, in one masked scatter, after checking that the counts agree.
    """

    def __init__(self, encoder: nn.Module, connector: nn.Module, llm: nn.Module, *, media_token_id: int, spec: ModelSpec,
                 extra: list[MediaBranch] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
        self.extra = nn.ModuleList(extra or [])
        self.media_token_id = media_token_id
        self.spec = spec
        self.restored: set[str] = set()  # parameter names loaded from a checkpoint: saved again by save_pretrained

    # -- parts --------------------------------------------------------------------------------------------------

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers ``*ForCausalLM`` (under the peft wrapper when LoRA is on; LoRA layers live inside it)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def tokens_per_item(self) -> int:
        return self.connector.num_output_tokens(self.encoder.info.num_tokens())

    def encode_media(self, pixel_values: torch.Tensor, branch: int | str | None = None) -> torch.Tensor:
        """``[n_items, ...]`` -> ``[n_items, tokens_per_item, hidden]``; ``branch`` picks an extra media kind, or
        ``"features"`` when the input already is the encoder's output."""
        if branch == "features":
            return self.connector(pixel_values.to(next(self.connector.parameters()).dtype))
        encoder, connector = (self.encoder, self.connector) if branch is None else (self.extra[branch].encoder, self.extra[branch].connector)
        features = encoder(pixel_values.to(next(encoder.parameters()).dtype))
        return connector(features.to(next(connector.parameters()).dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              extra_media: list[torch.Tensor | None] | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each media kind's connector outputs scattered at its placeholder positions.
        ``features`` (precomputed encoder outputs ``[n, N, D]``, from a feature cache) replace ``pixel_values``."""
        embeds = self.causal_lm.get_input_embeddings()(input_ids)
        kinds = [("features" if features is not None else None, self.media_token_id, features if features is not None else pixel_values)]
        kinds += [(i, b.token_id, (extra_media or [None] * len(self.extra))[i]) for i, b in enumerate(self.extra)]
        for branch, token_id, values in kinds:
            slots = input_ids == token_id
            n_slots = int(slots.sum())
            if values is None or len(values) == 0:
                if n_slots:
                    raise ValueError(f"input_ids hold {n_slots} placeholder tokens (id {token_id}) but no media of that kind were given")
                continue
            media = self.encode_media(values, branch)
            if media.shape[0] * media.shape[1] != n_slots:
                raise ValueError(
                    f"input_ids hold {n_slots} media placeholder tokens (id {token_id}) but {media.shape[0]} media items x "
                    f"{media.shape[1]} connector tokens were given; build inputs with this model's processor so each item "
                    f"expands to {media.shape[1]} tokens"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), media.to(embeds.dtype))
        return embeds

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = False,
        extra_media: list[torch.Tensor | None] | None = None,
        features: torch.Tensor | None = None,
        **_: Any,
    ) -> MultimodalOutput:
        """Loss over supervised positions only: the LM head and cross-entropy never see the other positions (on
        small LLMs the all-position ``[B, T, V]`` logits dominate the step). Same value as HF's causal-LM loss."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, position_ids, extra_media, features)
        logits = self.logits(hidden) if (return_logits or labels is None) else None
        if labels is None:
            return MultimodalOutput(None, None, 0, logits)
        targets = labels[:, 1:]
        supervised = targets != IGNORE
        picked = self.logits(hidden[:, :-1][supervised]).float()
        loss_sum = F.cross_entropy(picked, targets[supervised], reduction="sum")
        count = int(supervised.sum())
        return MultimodalOutput(loss_sum / max(count, 1), loss_sum, count, logits)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      pixel_values: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      extra_media: list[torch.Tensor | None] | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer hidden states ``[B, T, H]`` of the LLM over the spliced sequence (no LM head)."""
        embeds = self.embed(input_ids, pixel_values, extra_media, features)
        return self.causal_lm.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def sequence_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                          pixel_values: torch.Tensor | None = None, extra_media: list[torch.Tensor | None] | None = None,
                          features: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Summed log-probability of each row's supervised tokens ``[B]``: scores answer choices."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, extra_media=extra_media, features=features)
        targets = labels[:, 1:]
        supervised = targets != IGNORE
        logp = torch.log_softmax(self.logits(hidden[:, :-1][supervised]).float(), dim=-1)
        token_logp = logp.gather(1, targets[supervised].unsqueeze(1)).squeeze(1)
        rows = supervised.nonzero()[:, 0]
        return torch.zeros(len(input_ids), dtype=token_logp.dtype, device=token_logp.device).index_add_(0, rows, token_logp)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.causal_lm.get_output_embeddings()(hidden)
        config = self.causal_lm.config
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:  # Gemma-2/3 cap their logits; skipping it would change the loss
            out = torch.tanh(out / cap) * cap
        if str(getattr(config, "model_type", "")).startswith("cohere") and getattr(config, "logit_scale", None):
            out = out * config.logit_scale
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, extra_media: list[torch.Tensor | None] | None = None,
                 features: torch.Tensor | None = None, **generate_kwargs: Any) -> torch.Tensor:
        """New token ids ``[B, new]`` (batch with left padding). Media placeholder tokens are never generated."""
        embeds = self.embed(input_ids, pixel_values, extra_media, features)
        generate_kwargs.setdefault("suppress_tokens", [self.media_token_id, *(b.token_id for b in self.extra)])
        generate_kwargs.setdefault("do_sample", False)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # -- persistence --------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str, tokenizer: Any = None) -> None:
        from .checkpoint import save_model

        save_model(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str) -> tuple["MultimodalLM", MultimodalProcessor]:
        from .checkpoint import load_model

        return load_model(directory)


def build_model(spec: ModelSpec, *, tokenizer_dir: str | None = None) -> tuple[MultimodalLM, MultimodalProcessor]:
    """Build (model, processor) from a spec: encoder frozen, LLM frozen (LoRA adapters trainable), connector trainable.

    ``in_dim`` of the connector comes from the encoder and ``out_dim`` from the LLM's embedding width.
    """
    encoder = create_encoder(spec.encoder.name, **spec.encoder.options)
    domain = build_domain(spec.domain.name, spec.domain.options, encoder.info)
    llm, tokenizer = load_llm(spec.llm)
    if tokenizer_dir is not None:  # a checkpoint's own tokenizer (it already holds the media token)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    media_token_id = add_media_token(llm, tokenizer, spec.media_token)
    hidden = llm.get_input_embeddings().embedding_dim
    connector = create_connector(spec.connector.name, in_dim=encoder.info.embed_dim, out_dim=hidden, **spec.connector.options)
    # The connector always trains in fp32 (it is small); its output is cast to the LLM's dtype at the splice.
    encoder.requires_grad_(False)
    extra, kinds = [], []
    for media in spec.extra_media:
        extra_encoder = create_encoder(media.encoder.name, **media.encoder.options).requires_grad_(False)
        extra_domain = build_domain(media.domain.name, media.domain.options, extra_encoder.info)
        extra_connector = create_connector(media.connector.name, in_dim=extra_encoder.info.embed_dim, out_dim=hidden, **media.connector.options)
        branch = MediaBranch(extra_encoder, extra_connector, add_media_token(llm, tokenizer, media.token))
        extra.append(branch)
        kinds.append(MediaKind(media.name, media.token, branch.token_id, branch.tokens_per_item,
                               media_transform(extra_encoder.info, extra_domain), extra_domain))
    llm.requires_grad_(False)
    if spec.llm.lora is not None:
        llm = apply_lora(llm, spec.llm.lora)
    model = MultimodalLM(encoder, connector, llm, media_token_id=media_token_id, spec=spec, extra=extra)
    processor = MultimodalProcessor(
        tokenizer,
        media_token=spec.media_token,
        tokens_per_item=model.tokens_per_item,
        max_length=spec.max_length,
        transform=media_transform(encoder.info, domain),
        domain=domain,
        modality=encoder.info.modality,
        extra_kinds=kinds,
    )
    return model, processor


def media_transform(info: Any, domain: Any) -> Any:
    """The encoder-side transform that fits this domain's decoded media (checked for a modality match)."""
    if info.modality == "audio":
        if domain.output != "waveform":
            raise ValueError(f"{info.source} is an audio encoder but model.domain is {domain.name!r}; use domain: audio")
        return audio_transform(info)
    if domain.output == "waveform":
        raise ValueError(f"model.domain is audio but {info.source} is a {info.modality} encoder; use an hf_audio:... encoder")
    return image_transform(info, normalize=domain.output != "standardized")
