"""``mmdomain export RUN --format llava-hf|native|encoder OUT``: a trained run leaves mmdomain as a folder others load
(transformers' LLaVA, a self-contained mmdomain checkpoint with PEFT adapters, or the encoder alone), with a model card."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import CHECKPOINTS, read_json, resolve_checkpoint
from .export_output import ExportError, ExportWriter
from .model_card import model_card

log = logging.getLogger(__name__)

FORMATS = ("llava-hf", "native", "encoder")


def run_files(checkpoint: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the training recipe as a dict, the run's result.json) of a checkpoint, where they exist: the recipe from the
    checkpoint's trainer state, else the run's recipe.yaml; the result from the run directory the checkpoint is in."""
    from .train_state import STATE

    run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None
    recipe = None
    if (checkpoint / STATE).is_file():
        recipe = read_json(checkpoint / STATE).get("recipe")
    if recipe is None and run_dir is not None and (run_dir / "recipe.yaml").is_file():
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    result = None
    if run_dir is not None and (run_dir / "result.json").is_file():
        result = read_json(run_dir / "result.json")
        if result.get("checkpoint") and Path(result["checkpoint"]).name != checkpoint.name:
            log.warning("result.json of %s describes %s, not the exported %s; its evaluation and cost are stated anyway",
                        run_dir, result["checkpoint"], checkpoint)
    return recipe, result


def export(source: str | Path, out: str | Path, fmt: str, *, merge_lora: bool = False, overwrite: bool = False,
           bases: str = "copy") -> Path:
    """Export the newest complete checkpoint of run ``source`` (or checkpoint ``source``) to ``out`` in ``fmt``.
    ``out`` appears whole or not at all; an existing one is refused unless ``overwrite``."""
    from .builder import load_pretrained

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if merge_lora and fmt != "native":
        log.info("--merge-lora: the %s format always merges LoRA", fmt)
    out = Path(out)
    if out.exists() and not out.is_dir():  # before loading any weights, --overwrite or not
        raise ExportError(f"{out} is a file, not a folder; choose another OUT")
    if out.exists() and not overwrite:  # before loading any weights
        raise ExportError(f"{out} exists; choose a new OUT, or pass --overwrite to replace it (it is replaced only once the new export "
                          "is complete)")
    checkpoint = resolve_checkpoint(source)
    if out.resolve() == checkpoint.resolve() or out.resolve() in checkpoint.resolve().parents:
        raise ExportError(f"{out} holds the checkpoint being exported ({checkpoint}); --overwrite would replace it with its export: "
                          "choose another OUT")
    recipe, result = run_files(checkpoint)
    model, processor = load_pretrained(checkpoint)
    model.eval()
    spec_before = model.spec.model_dump(mode="json")
    infos = [encoder.info.to_dict() for encoder, _, _ in model.kind_parts()]
    if fmt == "llava-hf":
        from .export_llava import check_llava

        check_llava(model, processor, checkpoint)  # refused before an output folder is made
    with ExportWriter(out, overwrite=overwrite, marker=fmt == "native") as writer:
        if fmt == "llava-hf":
            from .export_llava import write_llava

            facts = write_llava(model, processor, writer.path, checkpoint)
            facts["merged_lora"] = True
            facts["usage"] = ["```python", "from transformers import AutoProcessor, LlavaForConditionalGeneration",
                              f"model = LlavaForConditionalGeneration.from_pretrained({str(out)!r})",
                              f"processor = AutoProcessor.from_pretrained({str(out)!r})",
                              "messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Describe the image.'}]}]",
                              "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
                              "inputs = processor(images=image, text=text, add_special_tokens=False, return_tensors='pt')",
                              "print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
                              "```", "", "The chat template already writes any BOS token: tokenize its text with add_special_tokens=False."]
        elif fmt == "native":
            from .export_native import write_native

            facts = write_native(model, processor, writer, merge_lora=merge_lora, bases=bases)
        else:
            from .export_encoder import write_encoder

            facts = write_encoder(model, writer.path, writer.target)
        (writer.path / "README.md").write_text(model_card(spec=spec_before, encoder_infos=infos, recipe=recipe, result=result,
                                                          export=facts, source=str(checkpoint)))
        (writer.path / "export.json").write_text(json.dumps({"source": str(checkpoint), **{k: v for k, v in facts.items() if k != "usage"}},
                                                            indent=2, default=str) + "\n")
    log.info("exported %s as %s to %s", checkpoint, fmt, out)
    return out
