"""Adapter for transformers audio encoders (``hf_audio:<dir>`` or ``hf_audio:<model type>`` with ``config=``):
the Whisper encoder, the wav2vec2 / HuBERT family and the CLAP audio tower (HTSAT). ``forward`` takes mono
waveforms ``[B, samples]`` at ``info.sample_rate``, padded or cropped to ``info.input_size``. Whisper's log-mel is
computed inside, in torch, on the model's device; CLAP's fused mel features come from its own feature extractor
(NumPy, on the CPU) because HTSAT expects exactly that layout."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._hf_loading import known_model_type, load_pruned
from .base import EncoderInfo, check_random_init, declared_license, layers_refused, random_init_refused, resolve_layer
from .errors import EncoderNotFoundError, EncoderOptionError, UnknownEncoderError

log = logging.getLogger(__name__)

_WHISPER = ("whisper",)
_WAV2VEC = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat")
_CLAP = ("clap", "clap_audio_model")
_CONFIG_CLASSES = {"clap_audio_model": "ClapAudioConfig"}  # model types built from their config class directly


class WhisperLogMel(nn.Module):
    """Whisper's log-mel front end: 25 ms Hann STFT every 10 ms, Slaney mel filters, log10, 8-decade floor, scaled."""

    def __init__(self, num_mel_bins: int, sample_rate: int = 16000, n_fft: int = 400, hop: int = 160) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        filters = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=num_mel_bins, min_frequency=0.0,
                                  max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("filters", torch.tensor(filters, dtype=torch.float32).T, persistent=False)  # [mel, freq]
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.n_fft, self.hop = n_fft, hop

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waveform.float(), self.n_fft, self.hop, window=self.window, return_complex=True)
        power = spec[..., :-1].abs() ** 2
        mel = (self.filters @ power).clamp(min=1e-10).log10()
        mel = torch.maximum(mel, mel.amax(dim=(-2, -1), keepdim=True) - 8.0)
        return (mel + 4.0) / 4.0


class HFAudioEncoder(nn.Module):
    def __init__(self, model: nn.Module, info: EncoderInfo, is_last: bool, kind: str, normalize: bool,
                 features: Any) -> None:
        super().__init__()
        self.model, self.info, self.features = model, info, features
        self._is_last, self._kind, self._normalize = is_last, kind, normalize

    @property
    def takes_lengths(self) -> bool:
        """wav2vec2-family towers use each clip's length (statistics over the clip, a padding mask where the model
        takes one); Whisper is trained on zero-padded 30 s windows and CLAP crops, so they take none."""
        return self._kind == "wav2vec"

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        n = self.info.input_size[0]
        if waveform.shape[-1] != n:  # the processor already fits clips; direct callers get the same rule
            waveform = F.pad(waveform, (0, n - waveform.shape[-1])) if waveform.shape[-1] < n else waveform[..., :n]
        dtype = next(self.model.parameters()).dtype
        extra: dict[str, Any] = {}
        if self._kind == "whisper":
            inputs = {"input_features": self.features(waveform).to(dtype)}
        elif self._kind == "clap":
            clips = [w.detach().float().cpu().numpy() for w in waveform]
            feats = self.features(clips, sampling_rate=self.info.sample_rate, return_tensors="pt")
            out = self.model(input_features=feats["input_features"].to(waveform.device, dtype),
                             is_longer=feats["is_longer"].to(waveform.device)).last_hidden_state
            return out.flatten(2).transpose(1, 2)  # [B, D, F, T] map -> [B, F*T, D] tokens
        else:
            valid = None
            if lengths is not None:
                valid = torch.arange(n, device=waveform.device)[None, :] < lengths.to(waveform.device)[:, None]
            if self._normalize:  # wav2vec2's feature extractor: zero mean, unit variance per clip (over the clip itself)
                w = valid.float() if valid is not None else torch.ones_like(waveform)
                count = w.sum(-1, keepdim=True).clamp(min=1)
                mean = (waveform * w).sum(-1, keepdim=True) / count
                var = ((waveform - mean) ** 2 * w).sum(-1, keepdim=True) / count
                waveform = (waveform - mean) / (var + 1e-7).sqrt() * w  # padding stays zero, as the extractor pads
            inputs = {"input_values": waveform.to(dtype)}
            # transformers: only layer-norm feature encoders were trained with a padding mask; group-norm ones
            # (wav2vec2-base) expect zero padding and no mask.
            if valid is not None and getattr(self.model.config, "feat_extract_norm", "group") == "layer":
                extra["attention_mask"] = valid.long()
        if self._is_last:
            return self.model(**inputs, **extra).last_hidden_state
        return self.model(**inputs, **extra, output_hidden_states=True).hidden_states[-1]

    def layer_blocks(self) -> list[nn.Module]:
        """The layers ``forward`` runs, input to output: Whisper's ``layers``, the wav2vec2 family's ``encoder.layers``,
        CLAP's HTSAT stages (``audio_encoder.layers``)."""
        for path in ("layers", "encoder.layers", "audio_encoder.layers"):
            try:
                return list(self.model.get_submodule(path))
            except AttributeError:
                continue
        raise AttributeError(f"{self.info.source}: no layer list found in {type(self.model).__name__}")

    def output_norm(self) -> nn.Module | None:
        if not self._is_last:
            return None
        if self._kind == "whisper":
            return self.model.layer_norm
        if self._kind == "clap":
            return self.model.audio_encoder.norm
        # The wav2vec2 family normalises after its layers only in the stable-layer-norm variant (before them otherwise).
        return self.model.encoder.layer_norm if getattr(self.model.config, "do_stable_layer_norm", False) else None


def locate_hf_audio(spec: str, *, random_init: bool = False, layers: Any = None, **_: Any) -> tuple[Path | None, str]:
    """(local directory or None, model type) for ``hf_audio:<spec>``, or the EncoderError building it would raise;
    reads only config.json, so a recipe's encoder can be checked before anything loads."""
    layers_refused(f"hf_audio:{spec}", layers)
    path = Path(spec).expanduser()
    source = f"hf_audio:{spec}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EncoderNotFoundError(f"{str(path)!r} has no config.json; it is not a transformers model directory")
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    elif "/" in spec or spec.startswith((".", "~")):
        raise EncoderNotFoundError(
            f"audio model directory {spec!r} does not exist. mmdomain never downloads (hub ids included): download it "
            "yourself, e.g. `huggingface-cli download <repo> --local-dir DIR`, and pass hf_audio:DIR"
        )
    else:
        # transformers 4.x registers CLAP's audio tower config under no model type of its own; its class is known.
        model_type = spec if spec in _CONFIG_CLASSES else known_model_type(spec, source, "hf_audio:DIR")
    if model_type not in _WHISPER + _WAV2VEC + _CLAP:
        raise UnknownEncoderError(f"hf_audio supports {', '.join(_WHISPER + _WAV2VEC + _CLAP)}; got model type {model_type!r}")
    check_random_init(source, random_init, path.is_dir())
    if not path.is_dir() and not random_init:
        raise random_init_refused(source, f"{spec!r} is not a local directory, so it names a model type whose encoder "
                                  "would be built from config alone",
                                  "the local model directory, hf_audio:DIR (e.g. from `huggingface-cli download <repo> --local-dir DIR`)")
    return (path if path.is_dir() else None), model_type


def build_hf_audio_encoder(spec: str, *, config: dict[str, Any] | None = None, random_init: bool = False, layer: int = -1,
                           layers: Any = None, clip_seconds: float | None = None, license: str | None = None) -> HFAudioEncoder:
    """``hf_audio:/models/whisper-small`` (the encoder half is kept) or ``hf_audio:wav2vec2`` / ``hubert`` /
    ``whisper`` with ``random_init=True`` and ``config={...}`` for a random-init model. ``clip_seconds`` sets the
    wav2vec2-family clip length (Whisper's is fixed by its positions: 30 s for released models)."""
    import transformers

    found, model_type = locate_hf_audio(spec, random_init=random_init, layers=layers)
    local = found is not None
    path = found or Path(spec)
    source = f"hf_audio:{spec}"
    if local:
        cfg = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    else:
        if model_type in _CONFIG_CLASSES:
            cfg = getattr(transformers, _CONFIG_CLASSES[model_type])(**(config or {}))
        else:
            cfg = transformers.AutoConfig.for_model(model_type, **(config or {}))
    if model_type in _WHISPER:
        kind, num_layers = "whisper", int(cfg.encoder_layers)
    elif model_type in _WAV2VEC:
        kind, num_layers = "wav2vec", int(cfg.num_hidden_layers)
    else:
        return _build_clap(path if local else None, cfg, layer, license)
    block_index, is_last = resolve_layer(layer, num_layers, f"hf_audio:{spec}")
    sample_rate, normalize = 16000, True
    if local and (path / "preprocessor_config.json").is_file():
        pre = json.loads((path / "preprocessor_config.json").read_text())
        sample_rate, normalize = int(pre.get("sampling_rate", 16000)), bool(pre.get("do_normalize", True))

    if kind == "whisper" and random_init and float(getattr(cfg, "init_std", 0.02)) < 0.1:
        # Whisper's positions are fixed sinusoids at unit scale while its convs and layers start at std 0.02, so a
        # random tower's output is nearly the positions alone (a tone and white noise measured ~3 % apart). The
        # wav2vec2 family is spared: its conv front end gets Kaiming init and random towers keep the sound.
        log.warning("%s with random_init: transformers' default init (config init_std %.3g) leaves the output dominated by the "
                    "positional embeddings, so different clips give nearly the same tokens and a frozen tower passes little of "
                    "the sound on. For a random tower that carries the sound set config: {init_std: 0.2} "
                    "(in a recipe: model.encoder.options.config.init_std=0.2), or use the tiny-audio encoder",
                    source, float(getattr(cfg, "init_std", 0.02)))
    if kind == "whisper":
        cfg.encoder_layers = block_index + 1
        cfg.decoder_layers = 1  # only the encoder is kept; do not build (or hold) the decoder stack
        if local:
            model = load_pruned(transformers.WhisperModel, path, cfg, needed_prefix="encoder.").encoder
        else:
            from transformers.models.whisper.modeling_whisper import WhisperEncoder

            model = WhisperEncoder(cfg)
        samples = int(cfg.max_source_positions) * 2 * 160  # frames are 10 ms hops at 16 kHz; conv stride 2
        tokens = int(cfg.max_source_positions)
        features: nn.Module | None = WhisperLogMel(int(cfg.num_mel_bins), sample_rate)
        dim = int(cfg.d_model)
    else:
        cfg.num_hidden_layers = block_index + 1
        model = load_pruned(transformers.AutoModel, path, cfg) if local else transformers.AutoModel.from_config(cfg)
        samples = int(round((clip_seconds or 10.0) * sample_rate))
        tokens = int(model._get_feat_extract_output_lengths(torch.tensor(samples)))
        features, dim = None, int(cfg.hidden_size)
    model.eval()
    info = EncoderInfo(
        modality="audio", embed_dim=dim, input_size=(samples,), patch_size=(max(1, samples // tokens),), channels=1,
        mean=(0.0,), std=(1.0,), source=source,
        license=declared_license(license, local),
        layer=layer, sample_rate=sample_rate, exact_tokens=tokens, weights=str(path) if local else None, time_ordered=True,
    )
    return HFAudioEncoder(model, info, is_last, kind, normalize, features)


def _build_clap(path: Path | None, cfg: Any, layer: int, license: str | None) -> HFAudioEncoder:
    """CLAP's HTSAT audio tower. Its stages change resolution, so only the final features (layer -1) are offered;
    the token count comes from one forward pass of silence (pure computation, no I/O)."""
    import transformers

    if layer != -1:
        raise EncoderOptionError(f"hf_audio CLAP offers layer=-1 only (HTSAT stages change resolution); got layer={layer}")
    audio_cfg = getattr(cfg, "audio_config", cfg)
    if path is None:
        model = transformers.ClapAudioModel(audio_cfg)
    elif getattr(cfg, "model_type", "") == "clap":
        # The text tower is dropped after loading, so only the audio tower's weights must be in the directory.
        model = load_pruned(transformers.ClapModel, path, cfg, needed_prefix="audio_model.").audio_model
    else:
        model = load_pruned(transformers.ClapAudioModel, path, audio_cfg)
    extractor_kwargs = {"truncation": "rand_trunc", "feature_size": int(audio_cfg.num_mel_bins)}
    if path is not None and (path / "preprocessor_config.json").is_file():
        pre = json.loads((path / "preprocessor_config.json").read_text())
        extractor_kwargs.update({k: pre[k] for k in ("sampling_rate", "hop_length", "fft_window_size", "max_length_s",
                                                      "frequency_min", "frequency_max") if k in pre})
    features = transformers.ClapFeatureExtractor(**extractor_kwargs)
    samples = int(features.nb_max_samples)  # clips are cropped to this, so rand_trunc never draws a random crop
    model.eval()
    probe = features([np.zeros(samples, np.float32)], sampling_rate=features.sampling_rate, return_tensors="pt")
    with torch.no_grad():
        grid = model(**probe).last_hidden_state.shape  # [1, D, F, T]
    info = EncoderInfo(
        modality="audio", embed_dim=int(grid[1]), input_size=(samples,), patch_size=(samples // (grid[2] * grid[3]),), channels=1,
        mean=(0.0,), std=(1.0,), source=f"hf_audio:{path or 'clap'}", license=declared_license(license, path is not None),
        layer=layer, sample_rate=int(features.sampling_rate), exact_tokens=int(grid[2] * grid[3]),
        weights=str(path) if path is not None else None,
    )
    return HFAudioEncoder(model, info, True, "clap", False, features)


__all__ = ["HFAudioEncoder", "WhisperLogMel", "build_hf_audio_encoder"]
