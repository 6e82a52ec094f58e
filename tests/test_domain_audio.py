"""Audio: header-capped decoding, downmix and resampling to the encoder's rate, Whisper / wav2vec2 encoders,
frame stacking, and a training step from WAV shards."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from encoders import audio_transform, create_encoder
from mmdomain.domains import DecodeError, build_domain
from mmdomain.domains.audio import resample

WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=80, max_source_positions=50)


def _signal(rate: int, seconds: float = 0.8) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 2500 * t) * np.exp(-t)).astype(np.float32)


def _wav(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def test_stereo_44k_and_mono_16k_reach_the_encoder_identically():
    encoder = create_encoder("hf_audio:whisper", random_init=True, config=WHISPER)
    assert encoder.info.sample_rate == 16000 and encoder.info.input_size == (16000,)
    domain = build_domain("audio", {}, encoder.info)
    fit = audio_transform(encoder.info)
    stereo = np.stack([_signal(44100), _signal(44100)], axis=1)
    (a,) = domain.decode("a.wav", _wav(stereo, 44100))
    (b,) = domain.decode("b.flac", _wav(_signal(16000), 16000, "FLAC"))
    x, y = fit(a), fit(b)
    assert x.shape == y.shape == (16000,)
    # Resampled 44.1 kHz equals the native 16 kHz recording (away from the clip's first and last milliseconds,
    # where the signal starts from silence with a kink that any band-limited resampler rings on).
    assert (x - y)[50:12750].abs().max() < 0.005 and (x[12800:] == 0).all()
    out = encoder(torch.stack([x, y]))
    assert out.shape == (2, encoder.info.num_tokens(), 32) and encoder.info.tokens_per_second == 50.0


def test_resampling_removes_what_the_new_rate_cannot_hold():
    t = np.arange(44100) / 44100
    y = resample(np.sin(2 * np.pi * 12000 * t), 44100, 16000)  # 12 kHz would alias to 4 kHz if decimated naively
    naive = np.sin(2 * np.pi * 12000 * t)[(np.arange(16000) * 44100 // 16000)]  # picking samples keeps an alias, RMS ~0.7
    assert len(y) == 16000 and np.sqrt(np.mean(y[200:-200] ** 2)) < 1e-6 < 0.5 < np.sqrt(np.mean(naive**2))  # < -120 dB
    # What passes the band lands where a native recording has it (the windowed sinc this replaced was off by 1.1e-4).
    native = _signal(16000)
    assert np.abs(resample(_signal(44100), 44100, 16000) - native)[50:12750].max() < 5e-5


def test_duration_is_capped_from_the_header_and_bad_files_are_named():
    domain = build_domain("audio", {"max_seconds": 0.25, "sample_rate": 8000})
    (clip,) = domain.decode("long.wav", _wav(_signal(16000, 3.0), 16000))
    assert len(clip) == 2000
    with pytest.raises(DecodeError, match="member 'empty.wav': empty audio"):
        domain.decode("empty.wav", _wav(np.zeros(0, np.float32), 16000))
    with pytest.raises(DecodeError, match="member 'junk.wav': LibsndfileError"):
        domain.decode("junk.wav", b"RIFF....not audio")
    with pytest.raises(DecodeError, match="not an audio type"):
        domain.decode("x.mp4", b"")


def test_wav2vec2_family_reports_exact_tokens():
    enc = create_encoder("hf_audio:hubert", random_init=True, config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                                        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
                         clip_seconds=2.0, layer=-2)
    assert enc.info.num_tokens() == 99 and enc.info.tokens_per_second == pytest.approx(49.5)
    assert enc(torch.randn(1, 32000)).shape == (1, 99, 32)


def test_frame_stack_sets_tokens_per_clip(tmp_path, tiny_llm_dir):
    from mmdomain.builder import build_model
    from mmdomain.spec import ModelSpec

    spec = ModelSpec.model_validate({"encoder": {"name": "hf_audio:whisper", "options": {"random_init": True, "config": WHISPER}},
                                     "connector": {"name": "frame_stack", "options": {"k": 4}},
                                     "llm": {"path": tiny_llm_dir}, "domain": {"name": "audio"}})
    model, proc = build_model(spec)
    assert model.tokens_per_item == math.ceil(50 / 4) == 13
    conv, media = proc.decode_media([{"role": "user", "content": "<image> where ?"}, {"role": "assistant", "content": "left"}],
                                    [("heart.wav", _wav(_signal(22050), 22050))])
    sample = proc(conv, media, key="heart")
    # The 0.8 s clip fills 40 of the window's 50 frames: ceil(40 / 4) = 10 tokens, not the full window's 13.
    assert int((sample.input_ids == proc.media_token_id).sum()) == 10 and sample.media[0].shape == (1, 16000)
    out = model(**proc.collate([sample]))
    assert torch.isfinite(out.loss)
    padded, padded_proc = build_model(ModelSpec.model_validate({**spec.model_dump(), "audio_tokens": "padded"}))
    assert int((padded_proc(conv, media, key="heart").input_ids == padded_proc.media_token_id).sum()) == 13
    with pytest.raises(ValueError, match="audio encoder but model.domain is 'generic'"):
        build_model(ModelSpec.model_validate({**spec.model_dump(), "domain": {"name": "generic"}}))


def test_whisper_directory_trains_from_wav_shards(tmp_path, tiny_llm_dir):
    from transformers import WhisperConfig, WhisperModel

    from mmdomain.cli import main

    WhisperModel(WhisperConfig(**WHISPER, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=64,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                               max_target_positions=16)).save_pretrained(str(tmp_path / "whisper"))
    (tmp_path / "media").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "media" / f"{i}.wav").write_bytes(_wav(_signal([8000, 44100][i % 2]), [8000, 44100][i % 2]))
        # Half the lines mark their clip with <audio> themselves; the others get the marker from make-shards.
        rows.append({"id": f"a{i}", "image": f"{i}.wav", "question": "<audio> where ?" if i < 2 else "where ?", "answer": ["left", "right"][i % 2]})
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "s.jsonl"), "--media", str(tmp_path / "media"), "--out",
                 str(tmp_path / "shards"), "--domain", "audio", "--media-token", "<audio>"]) == 0
    import tarfile

    with tarfile.open(next((tmp_path / "shards").glob("*.tar"))) as tar:
        questions = [json.load(tar.extractfile(m))["conversations"][0]["content"] for m in tar.getmembers() if m.name.endswith(".json")]
    assert questions == ["<audio> where ?"] * 4  # never "<image> <audio> where ?"
    recipe = {"model": {"encoder": {"name": f"hf_audio:{tmp_path / 'whisper'}", "options": {"layer": -1}},
                        "connector": {"name": "frame_stack", "options": {"k": 5}}, "llm": {"path": tiny_llm_dir},
                        "media_token": "<audio>", "domain": {"name": "audio", "options": {"max_seconds": 1.0}}},
              "data": {"train": str(tmp_path / "shards" / "*.tar"), "eval": str(tmp_path / "shards" / "*.tar")},
              "optim": {"max_steps": 2, "batch_size": 2}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["eval"]["samples"] == 4 and result["skipped_samples"] == 0


CLAP_AUDIO = dict(depths=[1, 1], num_attention_heads=[2, 4], patch_embeds_hidden_size=32, hidden_size=64, spec_size=256,
                  window_size=8, num_mel_bins=64, enable_fusion=False)


def test_clap_audio_tower_from_a_full_clap_directory(tmp_path):
    from transformers import ClapConfig, ClapModel

    full = ClapModel(ClapConfig(audio_config=CLAP_AUDIO, projection_dim=16,
                                text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, max_position_embeddings=64))).eval()
    full.save_pretrained(str(tmp_path / "clap"))
    enc = create_encoder(f"hf_audio:{tmp_path / 'clap'}")
    assert enc.info.sample_rate == 48000 and enc.info.input_size == (480000,)
    assert not any(n.startswith("text") for n, _ in enc.model.named_parameters())  # only the audio tower is kept
    wave = torch.randn(2, 480000) * 0.1
    out = enc(wave)
    assert out.shape == (2, enc.info.num_tokens(), 64) and enc.info.tokens_per_second == enc.info.num_tokens() / 10
    from transformers import ClapFeatureExtractor

    feats = ClapFeatureExtractor(truncation="rand_trunc")([w.numpy() for w in wave], sampling_rate=48000, return_tensors="pt")
    with torch.no_grad():
        ref = full.audio_model(**feats).last_hidden_state.flatten(2).transpose(1, 2)
        assert torch.allclose(enc(wave), ref, atol=1e-5)
    with pytest.raises(ValueError, match="layer=-1 only"):
        create_encoder("hf_audio:clap_audio_model", random_init=True, config=CLAP_AUDIO, layer=-2)


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / ((a.norm() + b.norm()) / 2))


def _tone_and_noise(samples: int = 16000) -> torch.Tensor:
    t = torch.arange(samples) / 16000
    noise = 0.3 * torch.randn(samples, generator=torch.Generator().manual_seed(1))
    return torch.stack([0.5 * torch.sin(2 * math.pi * 440 * t), noise])


def test_tiny_audio_output_carries_the_sound_at_random_init():
    enc = create_encoder("tiny-audio")
    assert (enc.info.modality, enc.info.sample_rate, enc.info.input_size, enc.info.tokens_per_second) == ("audio", 16000, (16000,), 50.0)
    with torch.no_grad():
        tone, noise = enc(_tone_and_noise())
        later = enc(torch.cat([torch.zeros(8000), _tone_and_noise()[0, :8000]])[None])[0]  # the same tone, half a second later
    assert tone.shape == (enc.info.num_tokens(), 64)
    # Different sounds give substantially different tokens (a default-init random Whisper: ~0.03, see the next test).
    assert _relative_difference(tone, noise) > 0.5 and _relative_difference(tone, later) > 0.3
    short = create_encoder("tiny-audio", sample_rate=8000, clip_seconds=0.33, layer=1)
    assert short(torch.randn(2, 100)).shape == (2, short.info.num_tokens(), 64) and short.info.num_tokens() == 17


def test_random_whisper_warns_that_positions_drown_the_sound_and_init_std_fixes_it(caplog):
    with caplog.at_level("WARNING", logger="encoders.hf_audio"):
        default = create_encoder("hf_audio:whisper", random_init=True, config=WHISPER)
    assert "dominated by the positional embeddings" in caplog.text and "init_std: 0.2" in caplog.text and "tiny-audio" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="encoders.hf_audio"):
        scaled = create_encoder("hf_audio:whisper", random_init=True, config={**WHISPER, "init_std": 0.2})
    assert caplog.text == ""
    with torch.no_grad():
        assert _relative_difference(*default(_tone_and_noise())) < 0.1 < 0.5 < _relative_difference(*scaled(_tone_and_noise()))


def test_tiny_audio_trains_through_frame_stack(tiny_llm_dir):
    from mmdomain.builder import build_model
    from mmdomain.spec import ModelSpec

    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-audio", "options": {"clip_seconds": 0.5}},
                                     "connector": {"name": "frame_stack", "options": {"k": 4}},
                                     "llm": {"path": tiny_llm_dir}, "domain": {"name": "audio"}})
    model, proc = build_model(spec)
    assert model.tokens_per_item == math.ceil(25 / 4) == 7
    conv, media = proc.decode_media([{"role": "user", "content": "<image> where ?"}, {"role": "assistant", "content": "left"}],
                                    [("heart.wav", _wav(_signal(44100), 44100))])
    sample = proc(conv, media, key="heart")
    assert sample.media[0].shape == (1, 8000)
    out = model(**proc.collate([sample, sample]))
    out.loss.backward()
    connector_grads = [p.grad for p in model.connector.parameters()]
    assert torch.isfinite(out.loss) and all(g is not None and g.abs().sum() > 0 for g in connector_grads)
    assert all(p.grad is None for p in model.encoder.parameters())  # frozen, as a recipe leaves it
