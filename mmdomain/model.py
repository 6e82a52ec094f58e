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
from .processor import IGNORE, MultimodalProcessor
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


class MultimodalLM(nn.Module):
    """Joins an encoder, a connector and a (possibly LoRA-wrapped) causal LM.

    Media tokens are written into ``input_ids`` by the processor; ``embed`` only scatters connector outputs into
    those positions, in order, in one masked scatter, after checking that the counts agree.
    """

    def __init__(self, encoder: nn.Module, connector: nn.Module, llm: nn.Module, *, media_token_id: int, spec: ModelSpec) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
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

    def encode_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n_items, C, H, W]`` -> ``[n_items, tokens_per_item, hidden]`` in the LLM's dtype."""
        enc_dtype = next(self.encoder.parameters()).dtype
        features = self.encoder(pixel_values.to(enc_dtype))
        con_dtype = next(self.connector.parameters()).dtype
        return self.connector(features.to(con_dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        embed_tokens = self.causal_lm.get_input_embeddings()
        embeds = embed_tokens(input_ids)
        slots = input_ids == self.media_token_id
        n_slots = int(slots.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} media placeholder tokens but no media were given")
            return embeds
        media = self.encode_media(pixel_values)
        if media.shape[0] * media.shape[1] != n_slots:
            raise ValueError(
                f"input_ids hold {n_slots} media placeholder tokens but {media.shape[0]} media items x {media.shape[1]} "
                "connector tokens were given; build inputs with this model's processor so each item expands to "
                f"{media.shape[1]} tokens"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), media.to(embeds.dtype))

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = False,
        **_: Any,
    ) -> MultimodalOutput:
        """Loss over supervised positions only: the LM head and cross-entropy never see the other positions (on
        small LLMs the all-position ``[B, T, V]`` logits dominate the step). Same value as HF's causal-LM loss."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, position_ids)
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
                      pixel_values: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer hidden states ``[B, T, H]`` of the LLM over the spliced sequence (no LM head)."""
        embeds = self.embed(input_ids, pixel_values)
        return self.causal_lm.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def sequence_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                          pixel_values: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Summed log-probability of each row's supervised tokens ``[B]``: scores answer choices."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values)
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
                 pixel_values: torch.Tensor | None = None, **generate_kwargs: Any) -> torch.Tensor:
        """New token ids ``[B, new]`` (batch with left padding). The media token itself is never generated."""
        embeds = self.embed(input_ids, pixel_values)
        generate_kwargs.setdefault("suppress_tokens", [self.media_token_id])
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
    llm.requires_grad_(False)
    if spec.llm.lora is not None:
        llm = apply_lora(llm, spec.llm.lora)
    model = MultimodalLM(encoder, connector, llm, media_token_id=media_token_id, spec=spec)
    processor = MultimodalProcessor(
        tokenizer,
        media_token=spec.media_token,
        tokens_per_item=model.tokens_per_item,
        max_length=spec.max_length,
        transform=media_transform(encoder.info, domain),
        domain=domain,
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
