"""Generation: seeded sampling repeats, beams run, stop strings cut, streaming equals greedy, a batch equals its prompts
one by one, and every tensor of a batch reaches the device the caller names (not the first parameter's)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmdomain.builder import build_model
from mmdomain.data import Record
from mmdomain.evaluate import evaluate_records
from mmdomain.generation import GenerationError, GenerationOptions, StopCutter, cut_at_stop, generate_batch, stream_generate
from mmdomain.media import MediaBatch
from mmdomain.spec import ModelSpec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts(tiny_llm_dir):
    torch.manual_seed(0)
    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}}, "llm": {"path": tiny_llm_dir}})
    model, proc = build_model(spec)
    model.eval()
    rng = np.random.default_rng(0)
    questions = ["where is the lesion ?", "describe the image", "is the finding left ?"]
    samples = [proc([{"role": "user", "content": f"<image> {q}"}], [rng.integers(0, 255, (32, 32), dtype=np.uint8)], key=f"s{i}",
                    add_generation_prompt=True) for i, q in enumerate(questions)]
    return model, proc, samples


def texts(model, proc, samples, **options):
    return [c.text for c in generate_batch(model, proc, samples, GenerationOptions(**options), CPU)]


def test_a_batch_answers_as_its_prompts_do_one_by_one(parts):
    model, proc, samples = parts
    batched = texts(model, proc, samples, max_new_tokens=8)
    alone = [texts(model, proc, [s], max_new_tokens=8)[0] for s in samples]
    assert batched == alone and all(batched)  # the random tiny LLM says something (not all-EOS), so the comparison means something


def test_seeded_sampling_repeats_and_differs_from_greedy(parts):
    model, proc, samples = parts
    sampled = dict(max_new_tokens=12, do_sample=True, temperature=5.0, top_k=0)
    first = texts(model, proc, samples, **sampled, seed=3)
    assert texts(model, proc, samples, **sampled, seed=3) == first
    others = {tuple(texts(model, proc, samples, **sampled, seed=s)) for s in (4, 5, 6)}
    assert others != {tuple(first)}  # a seed changes the answers: sampling is really on
    torch.manual_seed(11)
    before = torch.rand(1)
    torch.manual_seed(11)
    texts(model, proc, samples, **sampled, seed=3)
    assert torch.equal(torch.rand(1), before)  # a request's seed leaves the global random stream where it was


def test_beams_and_repetition_penalty_run_and_settings_are_checked(parts):
    model, proc, samples = parts
    out = generate_batch(model, proc, samples, GenerationOptions(max_new_tokens=6, num_beams=3), CPU)
    assert len(out) == 3 and all(c.finish_reason in ("stop", "length") for c in out)
    greedy = generate_batch(model, proc, samples[:1], GenerationOptions(max_new_tokens=8), CPU)[0].token_ids
    penalised = generate_batch(model, proc, samples[:1], GenerationOptions(max_new_tokens=8, repetition_penalty=20.0), CPU)[0].token_ids
    assert len(set(greedy)) < len(greedy) and len(set(penalised)) > len(set(greedy))  # the penalty breaks the loop
    with pytest.raises(GenerationError, match="num_beams must be 1"):
        stream_generate(model, proc, samples[0], GenerationOptions(num_beams=2), CPU)
    with pytest.raises(GenerationError, match="top_p"):
        GenerationOptions(top_p=1.5)


def test_stop_strings_cut_the_answer(parts):
    model, proc, samples = parts
    full = texts(model, proc, samples[:1], max_new_tokens=12)[0]
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = generate_batch(model, proc, samples[:1], GenerationOptions(max_new_tokens=12, stop=(stop,)), CPU)[0]
    assert cut.text == full[: full.index(stop)].strip() and cut.finish_reason == "stop" and stop not in cut.text
    assert cut.tokens < 12  # generation itself stopped, not just the text


def test_streaming_gives_the_greedy_text(parts):
    model, proc, samples = parts
    for sample in samples:
        greedy = texts(model, proc, [sample], max_new_tokens=10)[0]
        stream = stream_generate(model, proc, sample, GenerationOptions(max_new_tokens=10), CPU)
        pieces = list(stream)
        assert "".join(pieces) == greedy and stream.tokens >= 1
    words = greedy.split()
    stop = " ".join(words[1:3]) if len(words) >= 3 else words[-1]
    streamed = "".join(stream_generate(model, proc, samples[-1], GenerationOptions(max_new_tokens=10, stop=(stop,)), CPU))
    assert streamed == texts(model, proc, samples[-1:], max_new_tokens=10, stop=(stop,))[0]


def test_stop_cutter_never_sends_part_of_a_stop_string():
    cutter = StopCutter(["</ans>"])
    sent = [cutter.feed(p) for p in [" left", " side </", "an", "s> more"]]
    assert sent == ["left", " side", "", ""] and cutter.stopped and cutter.finish() == ""
    cutter = StopCutter(["</ans>"])
    assert cutter.feed("a </a") == "a" and cutter.finish() == " </a"  # never completed: sent at the end
    assert cut_at_stop("x STOP y END", ["END", "STOP"]) == ("x ", True)


class DeviceAsserting(torch.nn.Module):
    """Stands in for the model on a device with no memory ("meta"): every tensor it is handed must be there."""

    def __init__(self, model, device):
        super().__init__()
        self.inner, self.device, self.calls = model, torch.device(device), []

    @property
    def causal_lm(self):
        return self.inner.causal_lm

    @property
    def llm(self):
        return self.inner.llm

    def _check(self, *tensors):
        found = [t.device for t in tensors if isinstance(t, torch.Tensor)]
        found += [t.device for m in tensors if isinstance(m, list) for b in m if isinstance(b, MediaBatch)
                  for t in (b.values, b.lengths, b.tokens) if t is not None]
        assert found and all(d == self.device for d in found), found
        self.calls.append(len(found))

    def generate(self, input_ids, attention_mask=None, media=None, **kwargs):
        self._check(input_ids, attention_mask, media)
        return torch.full((input_ids.shape[0], 1), kwargs["eos_token_id"])

    def sequence_logprobs(self, input_ids, attention_mask, labels, media=None, **_):
        self._check(input_ids, attention_mask, labels, media)
        return torch.zeros(len(input_ids))


def test_every_tensor_of_an_eval_batch_goes_to_the_named_device(parts):
    model, proc, _ = parts
    image = np.zeros((32, 32), np.uint8)
    turns = [{"role": "user", "content": "<image> where is the lesion ?"}, {"role": "assistant", "content": "left"}]
    records = [Record(key="open", conversations=turns, media=[image]),
               Record(key="closed", conversations=turns, media=[image], choices=["left", "right"])]
    wrapped = DeviceAsserting(model, "meta")  # the model's own parameters stay on the CPU: the device comes from the caller
    report = evaluate_records(wrapped, proc, records, device="meta")
    assert report["samples"] == 2 and len(wrapped.calls) == 2 and all(n >= 3 for n in wrapped.calls)


def test_the_generate_command_batches_streams_and_names_its_device(parts, tmp_path, capsys):
    from mmdomain.builder import save_pretrained
    from mmdomain.cli import main
    from PIL import Image

    model, proc, _ = parts
    save_pretrained(model, proc, tmp_path / "ckpt")
    images = []
    for i in range(3):
        images += ["--image", str(tmp_path / f"{i}.png")]
        Image.fromarray(np.full((32, 32), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    common = ["-q", "generate", str(tmp_path / "ckpt"), "--question", "where is the lesion ?", "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*common, *images, "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(tmp_path / f"{i}.png") for i in range(3)]
    assert main([*common, *images[:2]]) == 0
    alone = capsys.readouterr().out.strip()
    assert alone == lines[0].split("\t")[1] and alone
    assert main([*common, *images[:2], "--stream"]) == 0
    assert capsys.readouterr().out.strip() == alone  # streamed, the same greedy answer
    assert main([*common, *images[:2], "--dtype", "bf16"]) == 0 and capsys.readouterr().out.strip()  # half precision runs
    assert main([*common, *images[:2], "--temperature", "0.7"]) == 2
    assert "add --do-sample" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*common[:-1], "cuda", *images[:2]]) == 2
        err = capsys.readouterr().err
        assert "--device: cuda, but torch sees no CUDA GPU here" in err and "Traceback" not in err
