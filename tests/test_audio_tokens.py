"""Audio clips cost LLM tokens in proportion to their length (model.audio_tokens: by_length), through the model, the
feature cache and encoders that mask padding; `padded` keeps the full window for every clip."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from mmdomain.builder import build_model
from mmdomain.cli import main
from mmdomain.data import FailureBudget, expand_shards, iter_records
from mmdomain.feature_cache import open_cache
from mmdomain.recipe import load_recipe
from mmdomain.spec import ModelSpec

RATE = 16000


def _tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _spec(tiny_llm_dir, **changes):
    spec = {"encoder": {"name": "tiny-audio", "options": {"clip_seconds": 30.0}}, "connector": {"name": "frame_stack", "options": {"k": 8}},
            "llm": {"path": tiny_llm_dir}, "domain": {"name": "audio"}, "media_token": "<audio>", "max_length": 1024}
    return ModelSpec.model_validate({**spec, **changes})


def _slots(proc, sample):
    return int((sample.input_ids == proc.media_token_id).sum())


def test_a_2_second_and_a_20_second_clip_cost_tokens_in_proportion(tiny_llm_dir):
    torch.manual_seed(0)
    model, proc = build_model(_spec(tiny_llm_dir))
    conv = [{"role": "user", "content": "<audio> which ?"}, {"role": "assistant", "content": "left"}]
    short, long = proc(conv, [_tone(2.0)], key="short"), proc(conv, [_tone(20.0)], key="long")
    # tiny-audio at 30 s gives 1500 frames (50/s); frame_stack k=8: 2 s -> ceil(100/8) = 13, 20 s -> 125, 30 s padded -> 188.
    assert (_slots(proc, short), _slots(proc, long)) == (13, 125)
    batch = proc.collate([short, long])
    assert batch["media"][0].tokens.tolist() == [13, 125] and batch["media"][0].lengths.tolist() == [2 * RATE, 20 * RATE]
    assert torch.isfinite(model(**batch).loss)

    torch.manual_seed(0)
    padded, padded_proc = build_model(_spec(tiny_llm_dir, audio_tokens="padded"))
    padded.load_state_dict(model.state_dict())
    assert _slots(padded_proc, padded_proc(conv, [_tone(2.0)], key="short")) == 188
    # The short clip's block holds exactly the first 13 connector outputs of its padded window.
    with torch.no_grad():
        full = padded.encode(0, padded_proc.collate([padded_proc(conv, [_tone(2.0)], key="s")])["media"][0])[0, :13]
        embeds = model.embed(batch["input_ids"][:1], [proc.collate([short])["media"][0]])
    spliced = embeds[0][batch["input_ids"][0] == proc.media_token_id]
    assert torch.allclose(spliced, full.to(spliced.dtype), atol=1e-6)


def test_generation_and_mixed_batches_line_up_with_the_placeholders(tiny_llm_dir):
    torch.manual_seed(0)
    model, proc = build_model(_spec(tiny_llm_dir))
    conv = [{"role": "user", "content": "<audio> then <audio> ?"}, {"role": "assistant", "content": "yes"}]
    sample = proc(conv, [_tone(1.0), _tone(5.0, 880)], key="two")
    assert _slots(proc, sample) == 7 + 32
    prompt = proc(conv[:1], [_tone(3.0)] * 2, key="gen", add_generation_prompt=True)
    assert _slots(proc, prompt) == 2 * 19
    out = model.generate(**{k: v for k, v in proc.collate([prompt], padding_side="left").items() if k in ("input_ids", "attention_mask", "media")},
                         max_new_tokens=2)
    assert out.shape[0] == 1


def test_connectors_that_mix_positions_keep_the_full_window(tiny_llm_dir):
    build = build_model
    # 0.32 s: 16 frames, a 4 x 4 grid pixel_shuffle accepts; it merges neighbours across the grid, so no prefix survives.
    model, proc = build(_spec(tiny_llm_dir, encoder={"name": "tiny-audio", "options": {"clip_seconds": 0.32}},
                              connector={"name": "pixel_shuffle", "options": {"factor": 2}}))
    assert proc.kinds[0].sizing is None
    conv = [{"role": "user", "content": "<audio> ?"}, {"role": "assistant", "content": "a"}]
    assert _slots(proc, proc(conv, [_tone(0.1)], key="short")) == 4


def test_wav2vec2_with_layer_norm_features_masks_the_padding():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from encoders import create_encoder

    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=[16, 16], conv_stride=[5, 4],
               conv_kernel=[10, 4], num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
               do_stable_layer_norm=True)
    enc = create_encoder("hf_audio:wav2vec2", random_init=True, config=cfg, clip_seconds=0.5)
    assert enc.takes_lengths and isinstance(enc.model, Wav2Vec2Model) and Wav2Vec2Config(**cfg).feat_extract_norm == "layer"
    clip = torch.from_numpy(_tone(0.25))
    quiet = torch.nn.functional.pad(clip, (0, 8000 - len(clip)))
    noisy = torch.cat([clip, torch.randn(8000 - len(clip))])
    lengths = torch.tensor([len(clip)] * 2)
    with torch.no_grad():
        masked = enc(torch.stack([quiet, noisy]), lengths=lengths)
        unmasked = enc(torch.stack([quiet, noisy]))
    frames = enc.info.num_tokens_for_samples(len(clip)) - 2  # the frames wholly inside the clip
    assert torch.allclose(masked[0, :frames], masked[1, :frames], atol=1e-4)  # what follows the clip no longer matters
    assert not torch.allclose(unmasked[0, :frames], unmasked[1, :frames], atol=1e-2)


def _wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="WAV")
    return buf.getvalue()


@pytest.fixture
def audio_recipe(tmp_path, tiny_llm_dir):
    (tmp_path / "media").mkdir()
    rows = []
    for i in range(8):
        (tmp_path / "media" / f"{i}.wav").write_bytes(_wav(_tone(0.5 + 0.5 * i, [300, 900][i % 2])))
        rows.append({"id": f"a{i}", "image": f"{i}.wav", "question": "<audio> pitch ?", "answer": ["low", "high"][i % 2]})
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "s.jsonl"), "--media", str(tmp_path / "media"), "--out",
                 str(tmp_path / "shards"), "--domain", "audio", "--media-token", "<audio>"]) == 0
    recipe = {"model": {**_spec(tiny_llm_dir, encoder={"name": "tiny-audio", "options": {"clip_seconds": 4.0}}).model_dump(mode="json")},
              "data": {"train": str(tmp_path / "shards" / "*.tar"), "eval": str(tmp_path / "shards" / "*.tar"), "shuffle_buffer": 0},
              "optim": {"max_steps": 2, "batch_size": 4}, "output_dir": str(tmp_path / "run"), "seed": 3}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    return tmp_path


def _cache_and_pipeline(audio_recipe):
    """Cache the recipe's features, then (model, processor, the full pipeline's batch, the cached records)."""
    assert main(["-q", "cache-features", str(audio_recipe / "r.yaml"), "--out", str(audio_recipe / "cache")]) == 0
    recipe = load_recipe(audio_recipe / "r.yaml")
    torch.manual_seed(recipe.seed)
    model, proc = build_model(recipe.model)
    raw = list(iter_records(expand_shards(recipe.data.train), proc.domains, failures=FailureBudget(0)))
    full = proc.collate([proc(r.conversations, r.media, key=r.key) for r in raw])
    train, _ = open_cache(audio_recipe / "cache", model, proc, recipe)
    return model, proc, full, list(iter_records(expand_shards(train), proc.domains, failures=FailureBudget(0)))


def test_the_feature_cache_stores_each_clips_own_frames_and_gives_the_same_loss(audio_recipe):
    model, proc, full, cached = _cache_and_pipeline(audio_recipe)
    # 0.5 s steps of 50 frames/s, carried to the end of the last 8-frame stack (frames_read), not 200 each
    assert [r.media[0].shape[0] for r in cached] == [min(200, 8 * -(-25 * (i + 1) // 8)) for i in range(8)]
    batch = proc.collate([proc(r.conversations, r.media, key=r.key) for r in cached])
    assert torch.equal(batch["input_ids"], full["input_ids"]) and batch["media"][0].tokens.tolist() == full["media"][0].tokens.tolist()
    with torch.no_grad():
        assert abs(model(**batch).loss.item() - model(**full).loss.item()) < 1e-3  # fp16 storage of the features
    assert main(["-q", "run", str(audio_recipe / "r.yaml"), f"data.feature_cache={audio_recipe / 'cache'}"]) == 0


def test_a_padded_run_refuses_a_cache_made_by_length(audio_recipe, capsys):
    assert main(["-q", "cache-features", str(audio_recipe / "r.yaml"), "--out", str(audio_recipe / "cache")]) == 0
    assert main(["-q", "run", str(audio_recipe / "r.yaml"), f"data.feature_cache={audio_recipe / 'cache'}", "model.audio_tokens=padded"]) == 2
    err = capsys.readouterr().err
    assert "feature cache" in err and "model.audio_tokens: 'by_length' in the cache, 'padded' here" in err


def test_a_spec_stored_before_the_option_loads_as_it_ran(tiny_llm_dir):
    from mmdomain.spec import with_legacy_defaults

    stored = _spec(tiny_llm_dir).model_dump(mode="json")
    del stored["audio_tokens"]  # checkpoints and trainer states written before model.audio_tokens existed
    assert ModelSpec.model_validate(with_legacy_defaults(stored)).audio_tokens == "padded"
    assert ModelSpec.model_validate(with_legacy_defaults({**stored, "audio_tokens": "by_length"})).audio_tokens == "by_length"


def _pitch_task(root, n_train=160, n_test=64, seed=0):
    """One tone per clip, 0.2-1.8 s long in a 2 s window, at a random level: "is the tone low or high?"."""
    rng = np.random.default_rng(seed)
    (root / "media").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(count):
            answer = ["low", "high"][int(rng.integers(2))]
            freq = float(rng.uniform(200, 400) if answer == "low" else rng.uniform(1500, 3000))
            name = f"{split}{i}.wav"
            (root / "media" / name).write_bytes(_wav(_tone(float(rng.uniform(0.2, 1.8)), freq) * float(rng.uniform(0.3, 1.0))))
            rows.append({"id": f"{split}{i}", "image": name, "question": "<audio> is the tone low or high ?", "answer": answer,
                         "choices": ["low", "high"]})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _train_pitch_task(root, llm_dir, audio_tokens):
    from mmdomain.domains import build_domain
    from mmdomain.recipe import validate_recipe
    from mmdomain.shards import make_shards
    from mmdomain.train import train

    shards = root / f"shards-{audio_tokens}"
    for split in ("train", "test"):
        make_shards(root / f"{split}.jsonl", root / "media", shards, prefix=split, domain=build_domain("audio"), media_token="<audio>")
    recipe = validate_recipe({
        "model": {**_spec(llm_dir, encoder={"name": "tiny-audio", "options": {"clip_seconds": 2.0}},
                          connector={"name": "frame_stack", "options": {"k": 4}}, audio_tokens=audio_tokens).model_dump(mode="json")},
        "trainable": {"connector": True, "llm": "full"},
        "data": {"train": str(shards / "train-*.tar"), "eval": str(shards / "test-*.tar"), "shuffle_buffer": 200},
        "optim": {"lr": 1e-3, "warmup_steps": 10, "max_steps": 60, "batch_size": 16},
        "output_dir": str(root / f"run-{audio_tokens}"), "log_every": 40,
    })
    result = train(recipe)
    return result["eval"]["closed"]["accuracy"], result


@pytest.mark.slow
def test_tokens_by_length_learn_the_audio_task_as_well_as_the_padded_window(tmp_path):
    from mmdomain.tiny_models import write_tiny_llm

    from .conftest import WORDS

    llm_dir = str(write_tiny_llm(tmp_path / "llm", WORDS + ["tone", "low", "or", "high"], hidden=64, ffn=128, layers=2))
    _pitch_task(tmp_path)
    by_length, _ = _train_pitch_task(tmp_path, llm_dir, "by_length")
    padded, _ = _train_pitch_task(tmp_path, llm_dir, "padded")
    print(f"held-out accuracy: by_length {by_length:.3f}, padded {padded:.3f}")
    assert by_length >= 0.9 and by_length >= padded - 0.05


def test_the_window_qformer_keeps_a_prefix_and_the_plain_one_does_not(tiny_llm_dir):
    from connectors import keeps_prefix

    assert keeps_prefix("qformer", {"window": 17}) and not keeps_prefix("qformer", {}) and not keeps_prefix("perceiver")
    model, proc = build_model(_spec(tiny_llm_dir, connector={"name": "qformer", "options": {"window": 10, "depth": 1, "heads": 4}}))
    conv = [{"role": "user", "content": "<audio> ?"}, {"role": "assistant", "content": "a"}]
    sample = proc(conv, [_tone(2.0)], key="short")
    assert _slots(proc, sample) == 10  # 100 frames in windows of 10, one query each; the 30 s window would give 150
    assert torch.isfinite(model(**proc.collate([sample])).loss)


def test_cached_clips_give_the_connector_the_same_tokens_as_the_encoder_does(audio_recipe):
    # 0.5 s steps are 25 frames: frame_stack k=8 reads past each clip's end into the encoder's output for the padding
    # (its last token stacks frames 24..31 of a 25-frame clip), and a cache must store those frames, not zeros.
    model, proc, full, records = _cache_and_pipeline(audio_recipe)
    cached = proc.collate([proc(r.conversations, r.media, key=r.key) for r in records])
    with torch.no_grad():
        direct, from_cache = model.encode(0, full["media"][0]), model.encode(0, cached["media"][0])
    for item, count in enumerate(full["media"][0].tokens.tolist()):
        assert torch.allclose(direct[item, :count], from_cache[item, :count], atol=2e-2), f"clip {item}"


def test_a_cache_trimmed_for_one_connector_is_refused_by_another(audio_recipe, capsys):
    # How far past a clip the cache keeps frames follows the connector (k=8 here), so k=4 must not reuse it.
    assert main(["-q", "cache-features", str(audio_recipe / "r.yaml"), "--out", str(audio_recipe / "cache")]) == 0
    assert main(["-q", "run", str(audio_recipe / "r.yaml"), f"data.feature_cache={audio_recipe / 'cache'}", "model.connector.options.k=4"]) == 2
    err = capsys.readouterr().err
    assert "feature cache" in err and "model.connector.options.k: 8 in the cache, 4 here" in err


def _as_before_the_option(run_dir) -> None:
    """Make ``run_dir`` look written by an mmdomain without model.audio_tokens (its recipe, specs and file sizes)."""
    recipe = run_dir / "recipe.yaml"
    recipe.write_text("".join(line for line in recipe.read_text().splitlines(keepends=True) if "audio_tokens" not in line))
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):
        for name, spec_at in (("trainer_state.json", ("recipe", "model")), ("mmdomain_config.json", ("spec",))):
            data = json.loads((checkpoint / name).read_text())
            node = data
            for key in spec_at:
                node = node[key]
            del node["audio_tokens"]
            (checkpoint / name).write_text(json.dumps(data))
        complete = json.loads((checkpoint / "COMPLETE").read_text())
        complete["files"] = {f: (checkpoint / f).stat().st_size for f in complete["files"]}
        (checkpoint / "COMPLETE").write_text(json.dumps(complete))


@pytest.mark.parametrize("recipe_file", ["run/recipe.yaml", "r.yaml"])
def test_a_run_from_before_the_option_resumes_as_it_ran(audio_recipe, recipe_file):
    # Neither the run's own recipe.yaml nor the user's YAML names audio_tokens: the run resumes padded, as it ran,
    # instead of being refused as changed to the new default.
    recipe = json.loads((audio_recipe / "r.yaml").read_text())
    del recipe["model"]["audio_tokens"]
    (audio_recipe / "r.yaml").write_text(json.dumps(recipe))
    assert main(["-q", "run", str(audio_recipe / "r.yaml"), "model.audio_tokens=padded"]) == 0
    _as_before_the_option(audio_recipe / "run")
    assert main(["-q", "run", str(audio_recipe / recipe_file), "--resume", "optim.max_steps=3"]) == 0
    assert "audio_tokens: padded" in (audio_recipe / "run" / "recipe.yaml").read_text()
    # Naming the new value is a change, refused as any other.
    assert main(["-q", "run", str(audio_recipe / recipe_file), "--resume", "optim.max_steps=4", "model.audio_tokens=by_length"]) == 2
