"""``mmdomain export --format llava-hf``: a run as a transformers ``LlavaForConditionalGeneration`` folder (config,
safetensors, processor with our chat template and image token) that transformers, vLLM and SGLang load without mmdomain.

Only the combination LLaVA itself computes is exported, checked piece by piece against how ``MultimodalLM`` wires
media: a transformers CLIP or SigLIP tower whose features are raw ``hidden_states`` (LLaVA selects them by
``vision_feature_layer`` and drops CLS with the ``default`` strategy), a 2-layer GELU MLP projector of the LLM's width,
the image token spliced in place of its placeholders, and an LM head used as is. Anything else is refused in one
error listing what is supported. LoRA on the encoder and the LLM is merged first.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .export_output import ExportError
from .lora_merge import merge_model_lora
from .model import head_transform

SUPPORTED = (
    "llava-hf export supports exactly: one media kind (images); encoder hf:<CLIP or SigLIP vision tower> at one layer or "
    "several (layers: [...]), CLS kept or dropped, but not SigLIP at its last layer (its post_layernorm is applied to "
    "last_hidden_state, which LLaVA never uses: train with layer: -2, as LLaVA does); connector mlp with depth 2 and "
    "hidden width equal to the LLM's (LLaVA-1.5's mlp2x_gelu); a 3-channel image domain decoding to [0, 1] (generic or "
    "medical 2-D; not standardised bands, volumes or audio); an LLM whose logits are its LM head's output (no soft-capping "
    "or scaling). LoRA on the encoder and the LLM is merged. For any other model use `mmdomain export RUN --format native OUT`"
)

_TOWERS = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP"}


def llava_refusals(model: Any, processor: Any) -> list[str]:
    """What keeps this model from being an exact ``LlavaForConditionalGeneration`` (empty when nothing does)."""
    reasons = []
    spec = model.spec
    if spec.extra_kinds:
        reasons.append(f"it takes {1 + len(spec.extra_kinds)} media kinds ({', '.join(k.token for k in spec.kinds())})")
    encoder, connector = model.encoder, model.connector
    tower = getattr(getattr(getattr(encoder, "model", None), "config", None), "model_type", None)
    if type(encoder).__name__ != "HFVisionEncoder" or tower not in _TOWERS:
        reasons.append(f"its encoder is {spec.encoder.name} ({type(encoder).__name__}{', ' + tower if tower else ''}), not a transformers "
                       "CLIP or SigLIP vision tower")
    else:
        if tower == "siglip_vision_model" and encoder._is_last:
            reasons.append(f"its encoder {spec.encoder.name} is SigLIP at its last layer ({encoder.info.layer}), whose features pass "
                           "through post_layernorm")
        if encoder._num_prefix > 1 and not encoder._keep_cls:
            reasons.append(f"its encoder drops {encoder._num_prefix} prefix tokens; LLaVA drops one (CLS) or none")
    layers = list(getattr(connector, "layers", []))
    if type(connector).__name__ != "MLPConnector" or len(layers) != 3:
        reasons.append(f"its connector is {spec.connector.name} {spec.connector.options or ''}".rstrip() + ", not mlp with depth 2")
    else:
        first, act, second = layers
        if first.out_features != second.out_features:
            reasons.append(f"its mlp connector's hidden width is {first.out_features}, not the LLM's {second.out_features}")
        if getattr(act, "approximate", "none") != "none":
            reasons.append("its mlp connector uses the tanh-approximated GELU")
        if (first.bias is None) != (second.bias is None):
            reasons.append("its mlp connector has a bias on one layer only")
    domain = processor.kinds[0].domain
    if getattr(domain, "output", "unit") != "unit" or getattr(domain, "volume_depth", None) is not None:
        reasons.append(f"its domain {spec.domain.name} decodes to {getattr(domain, 'output', '?')}"
                       + (" volumes" if getattr(domain, "volume_depth", None) else "") + ", not [0, 1] images")
    if encoder.info.channels != 3:
        reasons.append(f"its encoder takes {encoder.info.channels}-channel images, not RGB")
    probe = torch.linspace(-3, 3, 7)
    if not torch.equal(head_transform(model.causal_lm.config)(probe), probe):
        reasons.append(f"its LLM ({model.causal_lm.config.model_type}) transforms its logits after the LM head")
    return reasons


def check_llava(model: Any, processor: Any, source: Path) -> None:
    reasons = llava_refusals(model, processor)
    if reasons:
        raise ExportError(f"{source} cannot be exported as llava-hf: {'; '.join(reasons)}. {SUPPORTED}")


def llava_chat_template(processor: Any) -> str:
    """A chat template that renders HF-style messages (content as a list of ``{"type": "image"}`` / ``{"type": "text"}``
    parts, or a string) to exactly the text ``MultimodalProcessor`` renders: parts joined by one space, each image
    written as the media token, then the LLM's own template (or mmdomain's plain one when it has none)."""
    token = json.dumps(processor.media_token)
    normalise = (
        "{%- set mm = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set mm_text = m['content'] -%}"
        "{%- else -%}{%- set parts = namespace(items=[]) -%}"
        "{%- for p in m['content'] -%}"
        "{%- if p['type'] == 'text' -%}{%- if p['text'] -%}{%- set parts.items = parts.items + [p['text']] -%}{%- endif -%}"
        f"{{%- elif p['type'] in ('image', 'media') -%}}{{%- set parts.items = parts.items + [{token}] -%}}"
        "{%- endif -%}{%- endfor -%}{%- set mm_text = parts.items | join(' ') -%}{%- endif -%}"
        "{%- set mm.messages = mm.messages + [{'role': m['role'], 'content': mm_text}] -%}"
        "{%- endfor -%}"
        "{%- set messages = mm.messages %}"
    )
    if processor.use_chat_template:
        return normalise + processor.tokenizer.chat_template
    # mmdomain's plain template (processor._render_plain), written as Jinja.
    plain = ("{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
             "{% if m['role'] == 'system' %}{{ m['content'] + '\\n' }}"
             "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
             "{% else %}{{ 'Assistant: ' + m['content'] }}{% if eos_token %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endif %}"
             "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
    return normalise + plain


def _linear_state(layer: nn.Linear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {"weight": layer.weight.detach().to(dtype)}
    if layer.bias is not None:
        state["bias"] = layer.bias.detach().to(dtype)
    return state


def write_llava(model: Any, processor: Any, out: Path, source: Path) -> dict[str, Any]:
    """Write ``model`` (its LoRA merged in place) as a llava-hf folder into ``out``; returns the facts the model card
    states. Refuses (``ExportError``) any model ``LlavaForConditionalGeneration`` would not compute exactly."""
    from transformers import CLIPImageProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    check_llava(model, processor, source)
    merge_model_lora(model)
    encoder, connector, llm = model.encoder, model.connector, model.causal_lm
    dtype = next(llm.parameters()).dtype
    info = encoder.info
    taps = [tap + 1 for tap in encoder._taps]  # hidden_states[0] is the patch embedding; block b's output is b + 1
    strategy = "default" if encoder._num_prefix == 1 and not encoder._keep_cls else "full"
    first, _, second = connector.layers
    vision_config = encoder.model.config.to_dict()
    config = LlavaConfig(
        vision_config=vision_config, text_config=llm.config.to_dict(), image_token_id=processor.media_token_id,
        image_seq_length=processor.tokens_per_item, projector_hidden_act="gelu", vision_feature_select_strategy=strategy,
        vision_feature_layer=taps[0] if len(taps) == 1 else taps, multimodal_projector_bias=first.bias is not None,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    config.dtype = dtype
    with torch.device("meta"):  # no second copy of the weights: the real tensors are assigned below
        llava = LlavaForConditionalGeneration(config)
    cast = lambda state: {k: v.detach().to(dtype) for k, v in state.items()}  # noqa: E731
    llava.model.vision_tower.load_state_dict(cast(encoder.model.state_dict()), strict=True, assign=True)
    llava.model.multi_modal_projector.linear_1.load_state_dict(_linear_state(first, dtype), strict=True, assign=True)
    llava.model.multi_modal_projector.linear_2.load_state_dict(_linear_state(second, dtype), strict=True, assign=True)
    llava.model.language_model.load_state_dict(llm.get_decoder().state_dict(), strict=True, assign=True)
    llava.lm_head.load_state_dict(llm.get_output_embeddings().state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        llava.lm_head.weight = llava.model.language_model.get_input_embeddings().weight
    tokenizer = processor.tokenizer
    own = model.llm.generation_config
    eos = sorted({int(t) for s in (own.eos_token_id, tokenizer.eos_token_id) if s is not None for t in (s if isinstance(s, (list, tuple)) else [s])})
    # mmdomain decodes greedily and never generates a placeholder; the exported defaults do the same.
    llava.generation_config = GenerationConfig(eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                               suppress_tokens=[processor.media_token_id], do_sample=False)
    llava.save_pretrained(str(out), safe_serialization=True)

    height, width = info.input_size
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"height": height, "width": width}, resample=3, do_center_crop=False, crop_size={"height": height, "width": width},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(info.mean), image_std=list(info.std), do_convert_rgb=True,
    )
    if processor.media_token not in tokenizer.get_added_vocab():
        # A vocabulary that holds the marker as an ordinary word (a word-level stand-in, say) would not split the
        # image tokens LlavaProcessor writes back to back; as an added special token it is matched anywhere, same id.
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(processor.media_token, special=True, normalized=False)], special_tokens=True)
        if tokenizer.convert_tokens_to_ids(processor.media_token) != processor.media_token_id:
            raise ExportError(f"{source}: the tokenizer gives media token {processor.media_token!r} another id once it is marked special; "
                              "export with --format native")
    template = llava_chat_template(processor)
    tokenizer.chat_template = template  # the tokenizer alone renders part lists the same way
    hf_processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=int(info.patch_size[0]),
                                  vision_feature_select_strategy=strategy, chat_template=template, image_token=processor.media_token,
                                  num_additional_image_tokens=encoder._num_prefix)
    hf_processor.save_pretrained(str(out))
    image_processor.save_pretrained(str(out))  # preprocessor_config.json too, where readers before transformers 5 look
    return {"format": "llava-hf", "vision_feature_layer": config.vision_feature_layer, "vision_feature_select_strategy": strategy,
            "image_seq_length": processor.tokens_per_item, "image_token": processor.media_token, "dtype": str(dtype).removeprefix("torch."),
            "tower": _TOWERS[encoder.model.config.model_type]}
