"""``mmdomain export --format encoder``: the run's encoder (domain-tuned or original, LoRA merged) as a ``local:``
folder with its EncoderInfo and preprocessing, and, where the source library allows, a file that library loads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from encoders.local import SaveError, save_local

from .export_output import ExportError
from .lora_merge import merge_encoder_lora


def write_encoder(model: Any, out: Path, target: Path) -> dict[str, Any]:
    """Write the primary media kind's encoder into ``out`` (the folder that becomes ``target``); returns the facts the
    model card states."""
    spec = model.spec
    if spec.extra_kinds:
        raise ExportError(f"--format encoder exports one encoder; this model has {1 + len(spec.extra_kinds)} media kinds. Export the whole "
                          "model with --format native")
    encoder = model.encoder
    merged = merge_encoder_lora(encoder)
    try:
        saved = save_local(encoder, spec.encoder.name, spec.encoder.options, out)
    except SaveError as exc:
        raise ExportError(f"{exc}; export the whole model with --format native instead") from None
    usage = ["```python", "from encoders import create_encoder, image_transform   # mmdomain's encoders package, no mmdomain needed",
             f"encoder = create_encoder('local:{target}')",
             "tokens = encoder(image_transform(encoder.info)(pil_image)[None])   # [1, tokens, dim]", "```"]
    direct = saved.get("direct")
    if direct and direct["library"] == "transformers":
        usage += ["", "With transformers alone (the tower up to the selected layer):", "```python", f"from transformers import {direct['class']}",
                  f"model = {direct['class']}.from_pretrained('{target / direct['folder']}').eval()",
                  "out = model(pixel_values=x, output_hidden_states=True)",
                  f"# features: hidden_states {direct['hidden_states']} joined on the last axis"
                  + (" (the deepest as out.last_hidden_state)" if direct["last_hidden_state"] else "")
                  + (f", first {direct['drop_prefix']} token(s) dropped" if direct["drop_prefix"] else ""), "```"]
    elif direct and direct["library"] == "open_clip":
        usage += ["", "With open_clip alone (the whole CLIP model, the tuned visual tower in place):", "```python", "import open_clip",
                  f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{target / direct['folder']}')",
                  f"out = model.visual.forward_intermediates(x, indices=[{direct['block_index']}], stop_early=True, "
                  f"normalize_intermediates={direct['norm']}, intermediates_only=True, output_fmt='NCHW')",
                  "tokens = out['image_intermediates'][0].flatten(2).transpose(1, 2)", "```",
                  "(x preprocessed as encoder.json says: mmdomain squashes to the input size, open_clip's preprocess crops.)"]
    elif direct:
        kwargs = "".join(f", {k}={v!r}" for k, v in direct["create_model"].items())
        usage += ["", "With timm alone (the whole tower, the tuned blocks in place):", "```python", "import timm",
                  f"model = timm.create_model({direct['arch']!r}, pretrained=True, num_classes=0{kwargs},",
                  f"                          pretrained_cfg_overlay=dict(file='{target / direct['file']}')).eval()",
                  f"(tokens,) = model.forward_intermediates(x, indices=[{direct['block_index']}], norm={direct['norm']}, stop_early=True,",
                  "                                       output_fmt='NCHW', intermediates_only=True)   # then .flatten(2).transpose(1, 2)",
                  "```", "(x normalised with the mean and std of encoder.json's preprocessing.)"]
    return {"format": "encoder", "merged_lora": bool(merged), "encoder": saved["source"], "usage": usage}
