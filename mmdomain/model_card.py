"""The model card (README.md) written into every export: what the model is made of and under which licences, what
it is for, how it was evaluated and what training it cost, from the run's own files and the recipe's ``card`` block."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

UNKNOWN = "unknown: check the source"
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)


def declared_license(directory: str | Path | None) -> str | None:
    """The licence a model folder declares: its README.md front matter (``license:``, as Hugging Face model cards
    write it, with ``license_name`` for ``other``), else a ``license`` key of its config.json; None when it says none."""
    if directory is None:
        return None
    folder = Path(directory).expanduser()
    readme = folder / "README.md"
    if readme.is_file():
        match = _FRONT_MATTER.match(readme.read_text(errors="replace"))
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict) and meta.get("license"):
                name = str(meta["license"])
                return f"{name} ({meta['license_name']})" if name == "other" and meta.get("license_name") else name
    for name in ("config.json", "open_clip_config.json"):
        config = folder / name
        if config.is_file():
            try:
                value = json.loads(config.read_text()).get("license")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                value = None
            if value:
                return str(value)
    return None


def _encoder_folder(name: str, options: dict[str, Any]) -> Path | None:
    if options.get("weights"):
        return Path(options["weights"]).expanduser().parent
    _, sep, rest = name.partition(":")
    return Path(rest).expanduser() if sep and Path(rest).expanduser().is_dir() else None


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _metrics(report: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flat ``(name, value)`` of the numbers in an evaluation report."""
    rows = []
    for key, value in (report or {}).items():
        if isinstance(value, dict):
            rows += _metrics(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            rows.append((f"{prefix}{key}", round(value, 4) if isinstance(value, float) else value))
    return rows


def model_card(*, spec: dict[str, Any], encoder_infos: list[dict[str, Any]], recipe: dict[str, Any] | None, result: dict[str, Any] | None,
               export: dict[str, Any], source: str) -> str:
    """README.md text for an export of ``source`` (``export`` holds the format and what it did)."""
    card = (recipe or {}).get("card") or {}
    kinds = [{"name": "media", "token": spec.get("media_token", "<image>"), "encoder": spec["encoder"], "connector": spec.get("connector") or {},
              "domain": spec.get("domain") or {}}, *spec.get("extra_kinds", [])]
    medical = any((k.get("domain") or {}).get("name") == "medical" for k in kinds)
    llm = spec["llm"]
    llm_license = card.get("llm_license") or declared_license(llm["path"]) or UNKNOWN
    tags = ["mmdomain", "multimodal", *sorted({(k.get("domain") or {}).get("name", "generic") for k in kinds})]
    meta = {"library_name": "transformers" if export["format"] == "llava-hf" else "mmdomain", "tags": tags}
    if export["format"] == "llava-hf":
        meta["pipeline_tag"] = "image-text-to-text"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    lines += [f"# {Path(source).resolve().parent.parent.name if Path(source).parent.name == 'checkpoints' else Path(source).name}", ""]
    if medical:
        lines += ["> **Not for clinical use.** This model was trained for research on medical data; it is not a medical device, "
                  "has not been validated for diagnosis or treatment, and its outputs must not guide patient care.", ""]
    lines += [f"Exported by `mmdomain export --format {export['format']}` from `{source}`."
              + (" LoRA adapters are merged into the weights." if export.get("merged_lora") else ""), ""]
    lines += ["## Model", "", "| part | what | licence |", "|---|---|---|"]
    lines.append(f"| LLM | `{llm['path']}` ({llm.get('dtype', 'float32')}{', LoRA r=' + str(llm['lora']['r']) if llm.get('lora') else ''}) | {llm_license} |")
    for kind, info in zip(kinds, encoder_infos):
        encoder = kind["encoder"]
        licence = card.get("encoder_license") if kind["name"] == "media" else None
        licence = licence or declared_license(_encoder_folder(encoder["name"], encoder.get("options") or {}))
        recorded = info.get("license")
        licence = licence or (recorded if recorded and recorded != "unknown" else UNKNOWN)
        lora = f", LoRA r={encoder['lora']['r']}" if encoder.get("lora") else ""
        lines.append(f"| encoder ({kind['token']}) | `{encoder['name']}` layer {info.get('layer')}, {info.get('embed_dim')}-d, input "
                     f"{'x'.join(map(str, info.get('input_size', [])))}{lora} | {licence} |")
        connector = kind.get("connector") or {}
        lines.append(f"| connector ({kind['token']}) | `{connector.get('name', 'mlp')}` {json.dumps(connector.get('options') or {})} | "
                     "trained here (the licence of this export) |")
    lines += ["", f"Media are decoded by the `{', '.join(sorted({(k.get('domain') or {}).get('name', 'generic') for k in kinds}))}` domain "
              "(mmdomain); a consumer outside mmdomain must give the model images decoded the same way (for DICOM: the same "
              "windowing) at the encoder's input size.", ""]
    lines += ["## Data and intended use", "", f"- Training data licence: {card.get('data_license') or 'not declared in the recipe (card.data_license)'}",
              f"- Intended use: {card.get('intended_use') or 'not declared in the recipe (card.intended_use)'}"]
    out_of_scope = card.get("out_of_scope")
    if medical:
        out_of_scope = "; ".join(x for x in ("clinical use (diagnosis, triage, treatment decisions)", out_of_scope) if x)
    if out_of_scope:
        lines.append(f"- Out of scope: {out_of_scope}")
    if card.get("notes"):
        lines.append(f"- Notes: {card['notes']}")
    lines += ["", "## Evaluation", ""]
    report = (result or {}).get("eval")
    regime = {"zero-shot": "zero-shot (no sample of the evaluation benchmark was trained on)",
              "fine-tuned": "fine-tuned on that benchmark's train split (in-distribution; not comparable with zero-shot results)"}
    if report:
        data = ((recipe or {}).get("data") or {}).get("eval")
        lines += [f"Evaluation data: `{data}`" if data else "Evaluation data: the run's eval shards",
                  f"Regime: {regime.get(card.get('eval_regime'), 'not declared (set card.eval_regime: zero-shot or fine-tuned in the recipe)')}",
                  "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in _metrics(report)]
    else:
        lines.append("No evaluation results in this run's result.json.")
    lines += ["", "## Training", ""]
    if result:
        stage = result.get("stage") or (recipe or {}).get("stage")
        lines += [f"- Stage `{stage}`: {result.get('steps')} steps in {result.get('seconds')} s"
                  + (f" (resumed at steps {result['resumed_at']})" if result.get("resumed_at") else ""),
                  f"- Loss {_rounded(result.get('first_loss'))} -> {_rounded(result.get('final_loss'))}; skipped samples: {result.get('skipped_samples', 0)}"]
    else:
        lines.append("- No result.json beside this checkpoint: training cost unknown.")
    if (recipe or {}).get("init_from"):
        lines.append(f"- Initialised from `{recipe['init_from']}` (an earlier stage, whose cost is in its own result.json)")
    if recipe:
        optim = recipe.get("optim") or {}
        lines.append(f"- Trainable: `{json.dumps(recipe.get('trainable'))}`; batch {optim.get('batch_size')} x {optim.get('grad_accum')}, "
                     f"lr {optim.get('lr')}, precision {optim.get('precision')}")
    lines += ["", "## How to load", ""]
    if export["format"] == "llava-hf":
        layer = export.get("vision_feature_layer")
        lines += [f"`LlavaForConditionalGeneration` in {export.get('dtype')}: {export.get('tower')} hidden_states {layer} "
                  f"(vision_feature_select_strategy `{export.get('vision_feature_select_strategy')}`), {export.get('image_seq_length')} "
                  f"`{export.get('image_token')}` tokens per image. Images of the encoder's input size give mmdomain's pixels exactly; "
                  "other sizes are resized by the image processor's own bicubic kernel, which rounds differently."
                  + ("" if export.get("dtype") == "float32" else f" The vision tower and projector are stored in {export.get('dtype')} "
                     "like the LLM (mmdomain runs them in float32), so logits differ from mmdomain's by that rounding."), ""]
    if export["format"] == "native":
        lines += ["The frozen base LLM and encoders are " + ("copied into `bases/`: the folder is self-contained." if export.get("bases") == "copy"
                  else "referenced by path; their files' sha256 are checked when the checkpoint loads."), ""]
    lines += [*export.get("usage", []), ""]
    return "\n".join(lines)
