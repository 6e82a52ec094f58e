"""mmdomain vs TRL's SFTTrainer (what the HF docs teach for a transformers VLM): the same seeded
LlavaForConditionalGeneration weights, the same samples, TRL with its own collator (DataCollatorForVisionLanguageModeling
on a LlavaProcessor) and its default SFTConfig except where noted; stage-1 style (only the projector trains) and
stage-2 style (LoRA r16 on the LLM's linear layers + the projector).

One process: TRL's trainer runs its loop; a callback times each TRL step inside the trainer (on_step_begin ->
on_step_end: forward, backward, clipping, optimizer, scheduler) and then runs and times one mmdomain step, so the two
alternate step by step. Reported per variant as in bench_step.py: median ms and IQR of each side, per-round ratios
(``speedup_vs_baseline``, samples/s; ``real_tokens_per_s_ratio``), step-0 losses and whether they agree to 1e-5,
whether TRL's collator built the same tokens and labels as ours, and peak step memory (fresh process per side).

TRL settings changed from SFTConfig's defaults, and why: ``bf16=False`` (fp32, so step-0 losses compare at 1e-5;
bf16 autocast on CPU is an emulated path), ``report_to="none"`` and no checkpoint saving (no I/O inside timed steps),
``per_device_train_batch_size`` = the preset batch, ``max_steps``. Its defaults kept: gradient checkpointing on
(pass --trl-no-gradient-checkpointing to turn it off), completion-only loss on prompt-completion data, lr 2e-5 with
a linear schedule, grad-norm clipping at 1.0, AdamW (torch), its per-step entropy and token-accuracy metrics.

    pip install -e .[bench]
    python benchmarks/bench_trl.py --preset tiny --rounds 12 --out benchmarks/results/trl_tiny_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import make_variants  # noqa: E402
from environment import environment, write_report  # noqa: E402
from presets import build, spec  # noqa: E402

VARIANTS = {"stage1": "default", "lora": "lora"}  # TRL variant -> the bench_step variant it is compared with
WARMUP = 2
WIDE_IQR = 0.25  # a baseline whose IQR spans more than this fraction of its median is flagged: its ratios move

# Word-level chat template for the tiny tokenizer, rendering exactly what mmdomain's plain template renders:
# "<s> User: <image> Assistant: words </s>" (the LlavaProcessor expands <image> to the patch tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set parts = [{'type': 'text', 'text': m['content']}] %}{% else %}{% set parts = m['content'] %}{% endif %}"
    "{% if m['role'] == 'user' %} User:{% for c in parts %}{% if c['type'] == 'image' %} <image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} Assistant:{% for c in parts %} {{ c['text'] }}{% endfor %} {{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} Assistant:{% endif %}"
)


def trl_processor(built):
    """A LlavaProcessor over mmdomain's own tokenizer (same ids, <image> included) and a CLIP image processor that
    normalises as mmdomain's hf:clip encoder does (the images are 224 px already)."""
    from transformers import CLIPImageProcessor, LlavaProcessor
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from mmdomain.builder import build_model

    _, proc = build_model(spec(built.root))
    tokenizer = proc.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    p = built.preset
    image_processor = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True, do_convert_rgb=False,
                                         image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, size={"shortest_edge": p["image"]},
                                         crop_size={"height": p["image"], "width": p["image"]})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=p["patch"], vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def trl_dataset(built, steps: int):
    """A datasets.Dataset of prompt-completion samples with PIL images, as a user writes one (TRL then supervises the
    completion only, as mmdomain does): the preset's batch repeated once per step, the same samples as mmdomain's."""
    from datasets import Dataset
    from PIL import Image

    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}]}], "completion": [{"role": "assistant", "content": [{"type": "text", "text": words}]}],
             "images": [Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())]} for image, words in built.raw]
    return Dataset.from_list([r for _ in range(steps) for r in rows])


def trl_trainer(variant: str, built, llava, processor, steps: int, out: str, gradient_checkpointing: bool, callbacks=()):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=built.preset["batch"], bf16=False,
                       report_to="none", save_strategy="no", logging_steps=10**9, shuffle_dataset=False, disable_tqdm=True,
                       gradient_checkpointing=gradient_checkpointing, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    peft_config = None
    if variant == "stage1":
        llava.requires_grad_(False)
        llava.model.multi_modal_projector.requires_grad_(True)
    else:
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", modules_to_save=["multi_modal_projector"],
                                 target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    return SFTTrainer(model=llava, args=config, train_dataset=trl_dataset(built, steps), processing_class=processor,
                      peft_config=peft_config, callbacks=list(callbacks))


def _kib(field: str) -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))


def memory_of(side: str, variant: str, preset: str, gradient_checkpointing: bool) -> dict:
    """Fresh process: peak RSS over 3 steps after the first minus RSS before them (as bench_step.py measures)."""
    from transformers import TrainerCallback

    built = build(preset)
    if side == "mmdomain":
        step, _ = make_variants([VARIANTS[variant]], built, "cpu")[VARIANTS[variant]]
        step()
        Path("/proc/self/clear_refs").write_text("5")
        before = _kib("VmRSS")
        for _ in range(3):
            step()
        return {"peak_step_bytes": (_kib("VmHWM") - before) * 1024}
    marks = {}

    class Mark(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                Path("/proc/self/clear_refs").write_text("5")
                marks["before"] = _kib("VmRSS")
            elif state.global_step == 4:
                marks["peak"] = _kib("VmHWM")

    with tempfile.TemporaryDirectory() as out:
        trl_trainer(variant, built, built.llava, trl_processor(built), 4, out, gradient_checkpointing, [Mark()]).train()
    return {"peak_step_bytes": (marks["peak"] - marks["before"]) * 1024}


def run_variant(variant: str, built, rounds: int, gradient_checkpointing: bool) -> dict:
    from transformers import TrainerCallback

    from mmdomain.evaluate import to_device

    ours_step, ours_fn = make_variants([VARIANTS[variant]], built, "cpu")[VARIANTS[variant]]
    processor = trl_processor(built)
    llava = copy.deepcopy(built.llava)  # every TRL variant starts from the seeded weights, untouched by the others
    times = {"trl": [], "mmdomain": []}

    class Interleave(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            elapsed = time.perf_counter() - self.t0
            t0 = time.perf_counter()
            ours_step()
            if state.global_step > WARMUP:
                times["trl"].append(elapsed)
                times["mmdomain"].append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(variant, built, llava, processor, rounds + WARMUP, out, gradient_checkpointing, [Interleave()])
        trl_batch = to_device(trainer.data_collator([dict(r) for r in trl_dataset(built, 1)]), trainer.model.device)
        with torch.no_grad():
            trl_loss = trainer.model(**trl_batch).loss.item()  # the loss TRL's first step trains on
            ours_loss = ours_fn().item()
        same_tokens = bool(torch.equal(trl_batch["input_ids"], built.batch["input_ids"]) and torch.equal(trl_batch["labels"], built.batch["labels"]))
        same_pixels = bool(torch.allclose(trl_batch["pixel_values"], built.batch["media"][0].values, atol=1e-6))
        trainer.train()
    ratios = [b / o for b, o in zip(times["trl"], times["mmdomain"])]
    trl_tokens, ours_tokens = int(trl_batch["attention_mask"].sum()), int(built.batch["attention_mask"].sum())
    token_ratios = [(ours_tokens / o) / (trl_tokens / b) for b, o in zip(times["trl"], times["mmdomain"])]
    row = {"compared_with": f"bench_step variant {VARIANTS[variant]!r}", "gradient_checkpointing": gradient_checkpointing}
    for side in times:
        q = statistics.quantiles(times[side], n=4)
        med = statistics.median(times[side])
        row[side] = {"median_ms": 1000 * med, "iqr_ms": [1000 * q[0], 1000 * q[2]], "samples_per_s": built.preset["batch"] / med}
    base = row["trl"]
    base["relative_iqr"] = (base["iqr_ms"][1] - base["iqr_ms"][0]) / base["median_ms"]
    base["iqr_wide"] = base["relative_iqr"] > WIDE_IQR
    rq, tq = statistics.quantiles(ratios, n=4), statistics.quantiles(token_ratios, n=4)
    row["speedup_vs_baseline"] = {"median": statistics.median(ratios), "iqr": [rq[0], rq[2]]}
    row["real_tokens_per_s_ratio"] = {"median": statistics.median(token_ratios), "iqr": [tq[0], tq[2]]}
    row["step0_loss"] = {"trl": trl_loss, "mmdomain": ours_loss}
    row["loss_matches_baseline_1e-5"] = abs(trl_loss - ours_loss) <= 1e-5
    row["same_tokens_and_labels"], row["same_pixel_values"] = same_tokens, same_pixels
    row["real_tokens_per_step"] = {"trl": trl_tokens, "mmdomain": ours_tokens}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--trl-no-gradient-checkpointing", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    gc = not args.trl_no_gradient_checkpointing
    if args.memory_only:
        print(json.dumps(memory_of(*args.memory_only, args.preset, gc)))
        return
    import trl

    built = build(args.preset)
    results = {}
    for variant in args.variants.split(","):
        results[variant] = run_variant(variant, built, args.rounds, gc)
        if not args.no_memory:
            for side in ("trl", "mmdomain"):
                cmd = [sys.executable, __file__, "--preset", args.preset, "--memory-only", side, variant]
                cmd += (["--threads", str(args.threads)] if args.threads else []) + ([] if gc else ["--trl-no-gradient-checkpointing"])
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results[variant][side]["memory"] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[variant]["memory_ratio_vs_baseline"] = (results[variant]["mmdomain"]["memory"]["peak_step_bytes"]
                                                            / max(results[variant]["trl"]["memory"]["peak_step_bytes"], 1))
        print(variant, json.dumps(results[variant]), flush=True)
    env = environment("cpu")
    env["trl"] = trl.__version__
    report = {"preset": args.preset, "preset_dims": built.preset, "rounds": args.rounds, "baseline": "trl.SFTTrainer", "variants": results,
              "valid": all(r["loss_matches_baseline_1e-5"] for r in results.values()),
              "baseline_iqr_wide": any(r["trl"]["iqr_wide"] for r in results.values()), "env": env}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
