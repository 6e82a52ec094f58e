"""`mmdomain export --format llava-hf`: transformers loads the folder without mmdomain and computes what we compute."""
from __future__ import annotations

import json

import pytest
import torch

from mmdomain.builder import load_pretrained
from mmdomain.cli import main
from mmdomain.export import export
from mmdomain.export_output import ExportError
from mmdomain.tiny_models import write_tiny_llm

from .conftest import CHATML, WORDS
from .export_helpers import make_checkpoint, run_without_mmdomain, sample_image, write_tower

QUESTION = "where is the lesion ?"
# case -> (tower, template, checkpoint options)
CASES = {
    "clip-chat-lora": ("clip", "chat", dict(layer=-2, llm_lora=True, encoder_lora=True)),
    "siglip-plain": ("siglip", "plain", dict(layer=-2)),
    "clip-cls-layers": ("clip", "chat", dict(encoder={"options": {"layers": [-1, -2], "keep_cls": True}}, llm_lora=True)),
    # tied embeddings, CLIP's last layer, and a vocabulary holding <image> as an ordinary word
    "clip-last-tied": ("clip", "tied", dict(layer=-1)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each case exported, our own logits / ids / generations beside it, and one subprocess without mmdomain that
    loads every export with transformers alone."""
    root = tmp_path_factory.mktemp("llava")
    words = WORDS + ["<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    llms = {"chat": str(write_tiny_llm(root / "chat_llm", words, hidden=64, ffn=128, layers=2, chat_template=CHATML)),
            "plain": str(write_tiny_llm(root / "plain_llm", WORDS, hidden=64, ffn=128, layers=2)),
            "tied": str(write_tiny_llm(root / "tied_llm", WORDS + ["<image>"], hidden=64, ffn=128, layers=2, tie_word_embeddings=True))}
    towers = {kind: write_tower(root / kind, kind) for kind in ("clip", "siglip")}
    image = sample_image()
    image.save(root / "image.png")
    ours = {}
    for case, (tower, template, options) in CASES.items():
        options = dict(options)
        if "encoder" in options:
            options["encoder"] = {"name": f"hf:{towers[tower]}", **options["encoder"]}
        checkpoint = make_checkpoint(root / f"{case}-ckpt", llms[template], towers[tower], **options)
        export(checkpoint, root / case, "llava-hf")
        model, processor = load_pretrained(checkpoint)
        model.eval()
        sample = processor([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}],
                           add_generation_prompt=True)
        batch = processor.collate([sample], padding_side="left")
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True).logits[0]
            generated = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], max_new_tokens=8, min_new_tokens=6,
                                       pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
        ours[case] = {"ids": batch["input_ids"][0].tolist(), "logits": logits, "generated": generated[0].tolist(),
                      "tokens": processor.tokens_per_item}
    theirs = run_without_mmdomain(f"""
        import json, torch
        from PIL import Image
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        found = {{}}
        for case in {list(CASES)!r}:
            folder = {str(root)!r} + "/" + case
            model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
            processor = AutoProcessor.from_pretrained(folder)
            messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {QUESTION!r}}}]}}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(images=Image.open({str(root / 'image.png')!r}), text=text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits[0]
                new = model.generate(**inputs, max_new_tokens=8, min_new_tokens=6)[0, inputs["input_ids"].shape[1]:]
            found[case] = {{"ids": inputs["input_ids"][0].tolist(), "logits": logits.tolist(), "generated": new.tolist(),
                           "model": type(model).__name__}}
        print(json.dumps(found))
    """, cwd=root)
    return root, ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_alone_computes_our_logits_and_generations(exported, case):
    _, ours, theirs = exported
    mine, loaded = ours[case], theirs[case]
    assert loaded["model"] == "LlavaForConditionalGeneration"
    # the exported processor's chat template and image-token expansion give our input ids, token for token
    assert loaded["ids"] == mine["ids"]
    assert len(loaded["ids"]) > mine["tokens"]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), mine["logits"], atol=1e-5, rtol=0)
    assert loaded["generated"] == mine["generated"] and len(mine["generated"]) >= 6


def test_the_export_says_how_it_selects_features(exported):
    root, _, _ = exported
    clip = json.loads((root / "clip-chat-lora" / "config.json").read_text())
    siglip = json.loads((root / "siglip-plain" / "config.json").read_text())
    fused = json.loads((root / "clip-cls-layers" / "config.json").read_text())
    # CLIP drops its CLS token (LLaVA's default strategy), SigLIP has none to drop; layer -2 of 3 is hidden_states[2]
    assert (clip["vision_feature_select_strategy"], clip["vision_feature_layer"], clip["image_seq_length"]) == ("default", 2, 16)
    assert (siglip["vision_feature_select_strategy"], siglip["vision_feature_layer"]) == ("full", 2)
    assert (fused["vision_feature_select_strategy"], fused["vision_feature_layer"], fused["image_seq_length"]) == ("full", [3, 2], 17)
    assert clip["vision_config"]["num_hidden_layers"] == 2  # the layer after the selected one is not exported
    card = (root / "clip-chat-lora" / "README.md").read_text()
    assert "LoRA adapters are merged" in card and "LlavaForConditionalGeneration.from_pretrained" in card


def test_other_combinations_are_refused_in_one_line_that_points_to_native(tmp_path, tiny_llm_dir, capsys):
    timm_encoder = {"name": "timm:vit_tiny_patch16_224", "options": {"random_init": True, "image_size": 32, "depth": 1, "embed_dim": 32,
                                                                     "num_heads": 2}}
    checkpoint = make_checkpoint(tmp_path / "timm-ckpt", tiny_llm_dir, None, encoder=timm_encoder)
    with pytest.raises(ExportError, match=r"its encoder is timm:vit_tiny_patch16_224 \(TimmEncoder\), not a transformers CLIP or SigLIP") as err:
        export(checkpoint, tmp_path / "out", "llava-hf")
    assert "connector mlp with depth 2" in str(err.value) and "--format native" in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half-written

    tower = write_tower(tmp_path / "siglip", "siglip")
    checkpoint = make_checkpoint(tmp_path / "siglip-ckpt", tiny_llm_dir, tower, layer=-1, connector={"name": "pixel_shuffle", "options": {"factor": 2}})
    assert main(["export", str(checkpoint), "--format", "llava-hf", str(tmp_path / "out")]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmdomain ")]  # transformers' progress bars aside
    assert len(said) == 1 and "SigLIP at its last layer (-1)" in said[0] and "its connector is pixel_shuffle" in said[0]
    assert "mmdomain export RUN --format native OUT" in said[0]


def test_an_existing_export_is_kept_unless_overwrite_and_replaced_only_whole(tmp_path, tiny_llm_dir, capsys, monkeypatch):
    import mmdomain.export_llava as export_llava

    checkpoint = make_checkpoint(tmp_path / "ckpt", tiny_llm_dir, write_tower(tmp_path / "clip"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    (tmp_path / ".out.tmp-999999999").mkdir()  # left by an export killed while writing
    assert main(["export", str(checkpoint), "--format", "llava-hf", str(out)]) == 2
    assert "exists; choose a new OUT, or pass --overwrite" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"

    written = export_llava.write_llava

    def dies_halfway(model, processor, folder, source):
        written(model, processor, folder, source)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_llava, "write_llava", dies_halfway)
    assert main(["export", str(checkpoint), "--format", "llava-hf", str(out), "--overwrite"]) == 2
    assert (out / "mine.txt").read_text() == "keep" and not (out / "config.json").exists()  # the old folder, untouched
    monkeypatch.setattr(export_llava, "write_llava", written)
    assert main(["export", str(checkpoint), "--format", "llava-hf", str(out), "--overwrite"]) == 0
    assert main(["export", str(checkpoint), "--format", "native", str(tmp_path), "--overwrite"]) == 2  # never over its own source
    assert "holds the checkpoint being exported" in capsys.readouterr().err and (checkpoint / "model.safetensors").is_file()
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists() and not list(tmp_path.glob(".out*"))
