"""Tiny real-architecture stand-ins for the models the README downloads, and the data files its commands name.

Each model builder writes a directory laid out like the `huggingface-cli download` it replaces (config.json,
model.safetensors, tokenizer / preprocessor files), with small widths and random weights, so mmdomain loads it
through exactly the code path a real download takes. Nothing here is pickled; nothing touches the network.

Stand-ins for README downloads that mmdomain's README walk never loads are left out on purpose:
- SigLIP's and Whisper's own text tokenizers (mmdomain uses only the vision tower / the audio encoder);
- /models/BiomedCLIP: the README only runs `make-shards --recipe <biomedclip recipe>`, which reads the recipe's
  domain and never builds the encoder.
"""
from __future__ import annotations

import json
import wave
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

# The essential (tool-free) part of Qwen2.5-Instruct's chat template, as shipped in its tokenizer_config.json:
# a default system turn when none is given, `<|im_start|>role\ncontent<|im_end|>\n` per turn, and the generation
# prompt `<|im_start|>assistant\n`.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5-0.5B-Instruct's generation_config.json (token ids are set to the stand-in's own).
QWEN_GENERATION = {"do_sample": True, "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


def _seeded(seed: int):
    """A context that seeds torch for a builder and restores the caller's random stream afterwards."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope():
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.random.set_rng_state(state)

    return scope()


def build_siglip(directory: str | Path, *, image_size: int = 32, patch: int = 8, width: int = 32, layers: int = 3) -> Path:
    """Stand-in for `google/siglip-base-patch16-224`: a full `SiglipModel` (text and vision towers, as the download
    holds) with a 32-pixel, 8-pixel-patch vision tower, plus the download's `preprocessor_config.json` (what
    `encoders/hf_vision.py` reads for size, mean and std). `hf:DIR` takes the vision half."""
    from transformers import SiglipConfig, SiglipModel

    directory = Path(directory)
    config = SiglipConfig(
        text_config={"vocab_size": 64, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": 1, "bos_token_id": 1,
                     "eos_token_id": 2},
        vision_config={"image_size": image_size, "patch_size": patch, "hidden_size": width, "intermediate_size": 2 * width,
                       "num_hidden_layers": layers, "num_attention_heads": 2},
    )
    with _seeded(1):
        model = SiglipModel(config)
    model.save_pretrained(str(directory))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size}}, indent=2) + "\n")
    return directory


def qwen_tokenizer(corpus: Iterable[str], vocab_size: int = 600):
    """A Qwen2-style byte-level BPE tokenizer trained on ``corpus``: Qwen2's pre-tokenizer (its split regex, then
    byte-level), NFC, byte-level decoder, the full 256-byte alphabet (any text round-trips), `<|endoftext|>` /
    `<|im_start|>` / `<|im_end|>` as special tokens, eos `<|im_end|>`, pad `<|endoftext|>`, no bos, and the ChatML
    template. Returned as transformers' `Qwen2Tokenizer`, the class the real download's tokenizer_config names."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(list(corpus), trainer=trainer)
    model = json.loads(core.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    common = dict(unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                  additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=32768, clean_up_tokenization_spaces=False)
    try:  # transformers 5: the tokenizers-backed Qwen2Tokenizer takes the vocabulary and merges themselves
        tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, errors="replace", **common)
    except TypeError:  # transformers 4.x (pyproject allows >= 4.57): the fast class wraps the trained tokenizer
        from transformers import Qwen2TokenizerFast

        tok = Qwen2TokenizerFast(tokenizer_object=core, **common)
    for token in QWEN_SPECIAL:
        if token not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [token]}, replace_additional_special_tokens=False)
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    return tok


def check_chat_round_trip(tok, texts: Iterable[str]) -> None:
    """Assert the tokenizer gives back exactly the ChatML text of each conversation (what a word-level or lossy
    tokenizer fails), and that each special token is one id."""
    for token in QWEN_SPECIAL:
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{token!r} is not one token: {ids}"
    for text in texts:
        conversation = [{"role": "user", "content": f"<image> {text}"}, {"role": "assistant", "content": text}]
        rendered = tok.apply_chat_template(conversation, tokenize=False)
        assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_end|>\n"), rendered
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == rendered, f"tokenizer does not round-trip {rendered!r}: {tok.decode(ids)!r}"
        prompt = tok.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n") and rendered.startswith(prompt), (prompt, rendered)


def build_qwen2(directory: str | Path, corpus: Iterable[str], *, hidden: int = 64, layers: int = 2) -> Path:
    """Stand-in for `Qwen/Qwen2.5-0.5B-Instruct`: a tiny `Qwen2ForCausalLM` (tied embeddings, grouped-query
    attention, an embedding table with spare rows past the tokenizer as the real one has) with the tokenizer of
    `qwen_tokenizer` and a `generation_config.json` that samples by default, like Qwen's. Checks the round trip.

    Weights are drawn with std 0.2 (``initializer_range``; Qwen's config says 0.02): at 0.02 a random model with tied
    embeddings only echoes its last input token, so its greedy answer to any ChatML prompt is "\\n" repeated, which
    prints as an empty line and would hide whether `generate` and open-question evaluation pass text through."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    directory = Path(directory)
    corpus = list(corpus)
    tok = qwen_tokenizer(corpus)
    check_chat_round_trip(tok, corpus[:20])
    vocab = (len(tok) + 63) // 64 * 64 + 64  # Qwen pads its table (151936 rows for 151665 tokens)
    end, eos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=end, eos_token_id=eos, rope_theta=1000000.0, rms_norm_eps=1e-6, dtype="bfloat16",
                         initializer_range=0.2)
    with _seeded(2):
        model = Qwen2ForCausalLM(config).eval()
    for question in corpus[:8]:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        new = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=end)[0, ids.shape[1]:]
        answer = tok.decode(new, skip_special_tokens=True)
        assert answer.strip(), f"the stand-in answers {answer!r} to {question!r}; it must say something"
    model.to(torch.bfloat16)  # as the download's safetensors are stored
    model.generation_config = GenerationConfig(bos_token_id=end, eos_token_id=[eos, end], pad_token_id=end, **QWEN_GENERATION)
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def build_whisper(directory: str | Path, *, mel_bins: int = 16, positions: int = 16, width: int = 32) -> Path:
    """Stand-in for `openai/whisper-small`: a tiny `WhisperForConditionalGeneration` whose encoder takes
    ``2 * positions`` mel frames (``positions * 320`` samples at 16 kHz: 0.32 s) of ``mel_bins`` bins, plus the
    download's `preprocessor_config.json` (sampling rate and mel count; `encoders/hf_audio.py` reads the rate)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    directory = Path(directory)
    config = WhisperConfig(vocab_size=96, num_mel_bins=mel_bins, d_model=width, encoder_layers=2, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width,
                           max_source_positions=positions, max_target_positions=16, pad_token_id=95, bos_token_id=95, eos_token_id=95,
                           decoder_start_token_id=94, begin_suppress_tokens=None)
    with _seeded(3):
        model = WhisperForConditionalGeneration(config)
    model.save_pretrained(str(directory))
    samples = positions * 2 * 160
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "chunk_length": samples / 16000, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": mel_bins,
        "hop_length": 160, "n_fft": 400, "n_samples": samples, "nb_max_frames": samples // 160, "padding_side": "right",
        "padding_value": 0.0, "processor_class": "WhisperProcessor", "return_attention_mask": False, "sampling_rate": 16000}, indent=2) + "\n")
    return directory


# -- the README's data -------------------------------------------------------------------------------------------

FINDINGS = ["no acute finding", "small left pleural effusion", "right lower lobe opacity", "cardiomegaly"]
CLOSED = [("Is there a pleural effusion?", ["yes", "no"]), ("Is the heart enlarged?", ["yes", "no"])]
OPEN = ["What is the main finding?", "Where is the opacity?"]
LABELS = ["normal", "pleural effusion", "opacity", "cardiomegaly"]  # FINDINGS as labels.csv names them


def _xray(rng: np.random.Generator, finding: int, size: int = 64) -> np.ndarray:
    """A grey 'chest film': two lung fields, a finding drawn as a bright blob whose place depends on ``finding``."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.35 + 0.1 * rng.normal(size=(size, size))
    img -= 0.2 * ((np.abs(x - 0.3) < 0.15) | (np.abs(x - 0.7) < 0.15))
    cy, cx = [(0.5, 0.5), (0.75, 0.3), (0.75, 0.7), (0.55, 0.5)][finding]
    img += 0.4 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.01) * (finding > 0)
    return np.clip(img, 0, 1)


def _write_cxr_dicom(path: Path, image: np.ndarray) -> None:
    """A MONOCHROME1 12-bit digital X-ray with its own VOI window and patient attributes (which make-shards strips)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    stored = np.round((1 - image) * 4095).astype(np.uint16)  # MONOCHROME1: high values display dark
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.Modality = "Doe^Jane", "CXR-" + path.stem, "20240101", "DX"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_cxr_data(root: Path, *, n_captions: int = 16, n_vqa: int = 16, n_test: int = 8, seed: int = 0) -> list[str]:
    """``images/cxr/NNN.png`` (every fifth one a MONOCHROME1 DICOM ``NNN.dcm`` instead, as the README's JSONL
    example has), ``captions.jsonl`` (align), ``vqa.jsonl`` (instruct) and ``test.jsonl`` (held out): closed
    questions carry ``choices`` and ``answer_type: closed``, open ones ``answer_type: open``, as the instruct
    recipe's header asks. ``images/cxr/042.png`` (the README's generate command) is always a PNG. ``labels.csv``
    (media, label, patient) feeds the README's `make-instructions labels`.
    Returns the texts, for training the stand-in tokenizer."""
    rng = np.random.default_rng(seed)
    media = root / "images" / "cxr"
    media.mkdir(parents=True, exist_ok=True)
    total = n_captions + n_vqa + n_test
    names, findings = [], []
    for i in range(1, max(total, 42) + 1):
        finding = int(rng.integers(len(FINDINGS)))
        image = _xray(rng, finding)
        if i % 5 == 0 and i != 42:
            _write_cxr_dicom(media / f"{i:03d}.dcm", image)
            names.append(f"cxr/{i:03d}.dcm")
        else:
            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(media / f"{i:03d}.png")
            names.append(f"cxr/{i:03d}.png")
        findings.append(finding)

    def vqa(i: int, j: int) -> dict:
        finding = findings[i]
        if j % 2 == 0:
            question, choices = CLOSED[(j // 2) % 2]
            answer = "yes" if (question == CLOSED[0][0] and finding == 1) or (question == CLOSED[1][0] and finding == 3) else "no"
            return {"id": f"q{i:03d}", "image": names[i], "question": question, "answer": answer, "choices": choices, "answer_type": "closed"}
        question = OPEN[(j // 2) % 2]
        answer = FINDINGS[finding] if question == OPEN[0] else ["none", "left lower zone", "right lower zone", "none"][finding]
        return {"id": f"q{i:03d}", "image": names[i], "question": question, "answer": answer, "answer_type": "open"}

    # Two images per patient, as in labels.csv: the caption table's --group-key column.
    captions = [{"id": f"c{i:03d}", "image": names[i], "caption": f"Chest radiograph: {FINDINGS[findings[i]]}.", "patient": f"P{i // 2:03d}"}
                for i in range(n_captions)]
    train = [vqa(i, j) for j, i in enumerate(range(n_captions, n_captions + n_vqa))]
    test = [vqa(i, j) for j, i in enumerate(range(n_captions + n_vqa, total))]
    for name, rows in (("captions", captions), ("vqa", train), ("test", test)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The labels table of "Instruction data from labels": one finding per image ("normal" means none), two images per patient.
    labels = [f"{media},{LABELS[f]},P{i // 2:03d}" for i, (media, f) in enumerate(zip(names, findings))]
    (root / "labels.csv").write_text("media,label,patient\n" + "\n".join(labels) + "\n")
    texts = [r["caption"] for r in captions] + [f"{r['question']} {r['answer']}" for r in train + test]
    return texts + ["Describe the image.", "Is there a pleural effusion?"]


def write_ct_data(root: Path, n: int = 6, seed: int = 0) -> None:
    """``dicom/ctNN.dcm`` (synthetic CT slices in HU, some MONOCHROME1, with patient attributes) and ``ct.jsonl``."""
    from .domain_tasks import QUADRANTS, ct_slice, write_dicom

    rng = np.random.default_rng(seed)
    (root / "dicom").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        q = i % 4
        write_dicom(root / "dicom" / f"ct{i:02d}.dcm", ct_slice(rng, q), monochrome1=i % 3 == 0, intercept=-1024.0, slope=1.0,
                    patient="Roe^Richard^Secretname")
        rows.append({"id": f"ct{i:02d}", "image": f"ct{i:02d}.dcm", "question": "Where is the finding?", "answer": QUADRANTS[q],
                     "choices": QUADRANTS})
    (root / "ct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_wav(path: Path, seconds: float, freq: float, rate: int = 22050) -> None:
    """A stereo 16-bit WAV at another rate than the encoder's (the audio domain downmixes and resamples)."""
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 1.5 * t))
    frames = np.stack([tone, 0.8 * tone], axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(frames * 32767).astype("<i2").tobytes())


def write_mixed_data(root: Path, n: int = 8) -> None:
    """``mixed/`` with a chest image and a heart sound per sample, and ``mixed.jsonl`` whose user turn holds both
    markers (`<image>` and `<audio>`), for the README's mixed-media recipe fragment."""
    media = root / "mixed"
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        murmur = i % 2
        Image.fromarray(np.round(_xray(rng, 3 * murmur) * 255).astype(np.uint8)).save(media / f"{i}.png")
        _write_wav(media / f"{i}.wav", 0.4, 60.0 if murmur else 120.0)
        rows.append({"id": f"m{i}", "media": [f"{i}.png", f"{i}.wav"], "choices": ["yes", "no"],
                     "conversations": [{"role": "user", "content": "<image> <audio> Is there a murmur?"},
                                       {"role": "assistant", "content": ["no", "yes"][murmur]}]})
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# `huggingface-cli download REPO --local-dir DIR` lines of the README, and the builder that stands in for each.
# The Qwen builder also needs the texts it trains its BPE on, so builders take (directory, corpus).
STANDINS: dict[str, Callable[[Path, list[str]], Path]] = {
    "google/siglip-base-patch16-224": lambda d, corpus: build_siglip(d),
    "Qwen/Qwen2.5-0.5B-Instruct": build_qwen2,
    "openai/whisper-small": lambda d, corpus: build_whisper(d),
}
