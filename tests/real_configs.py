"""Configuration files (no weights) of the real models the shipped recipes name under /models, at their real sizes.

`mmdomain plan` reads only these files, so a folder holding them stands in for each download exactly: a plan made
from it is the plan of the real model. The values are those of the downloads' own config.json /
open_clip_config.json / preprocessor_config.json (fields left at the library's defaults are left out, as there).
"""
from __future__ import annotations

import json
from pathlib import Path

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "sliding_window": 32768, "max_window_layers": 21, "attention_dropout": 0.0,
}
QWEN25_05B_PARAMETERS = 494_032_768  # the published count of Qwen2.5-0.5B (tied embeddings)

SIGLIP_BASE = {  # google/siglip-base-patch16-224: both towers at SigLIP's defaults (768 wide, 12 layers, 224 px, patch 16)
    "architectures": ["SiglipModel"], "model_type": "siglip", "initializer_factor": 1.0,
    "text_config": {"model_type": "siglip_text_model"}, "vision_config": {"model_type": "siglip_vision_model"},
}
SIGLIP_PREPROCESSOR = {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                       "size": {"height": 224, "width": 224}, "resample": 3, "rescale_factor": 1 / 255}

WHISPER_SMALL = {
    "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", "d_model": 768, "encoder_layers": 12,
    "encoder_attention_heads": 12, "encoder_ffn_dim": 3072, "decoder_layers": 12, "decoder_attention_heads": 12,
    "decoder_ffn_dim": 3072, "num_mel_bins": 80, "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 51865,
    "pad_token_id": 50257, "bos_token_id": 50257, "eos_token_id": 50257, "decoder_start_token_id": 50258,
}
WHISPER_PREPROCESSOR = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80, "sampling_rate": 16000,
                        "hop_length": 160, "n_fft": 400, "chunk_length": 30, "n_samples": 480000, "nb_max_frames": 3000}

BIOMEDCLIP = {  # microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
    "model_cfg": {"embed_dim": 512,
                  "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                                 "timm_proj": "linear", "image_size": 224},
                  "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", "hf_tokenizer_name":
                               "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", "proj": "mlp",
                               "pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}},
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}

REMOTECLIP_B32 = {  # chendelong/RemoteCLIP, ViT-B-32 (open_clip's ViT-B-32 architecture)
    "model_cfg": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}

# directory under /models -> {file name: content}
MODEL_DIRS = {
    "Qwen2.5-0.5B-Instruct": {"config.json": QWEN25_05B},
    "siglip-base-patch16-224": {"config.json": SIGLIP_BASE, "preprocessor_config.json": SIGLIP_PREPROCESSOR},
    "whisper-small": {"config.json": WHISPER_SMALL, "preprocessor_config.json": WHISPER_PREPROCESSOR},
    "BiomedCLIP": {"open_clip_config.json": BIOMEDCLIP},
    "RemoteCLIP-ViT-B-32": {"open_clip_config.json": REMOTECLIP_B32},
}


def write_model_configs(root: Path) -> Path:
    """``root/<name>/<config files>`` for every model the shipped recipes name under /models; returns ``root``."""
    for name, files in MODEL_DIRS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for file, content in files.items():
            (root / name / file).write_text(json.dumps(content, indent=2) + "\n")
    return root
