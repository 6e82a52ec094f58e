"""The lmms-eval model `mmdomain` (registered through the `lmms_eval.models` entry point, see ``lmms_plugin``):
`lmms-eval --model mmdomain --model_args run=RUN[,device=cuda,batch_size=8]` evaluates a trained run.

Docs of tasks written by `mmdomain lmms-task` name a shard and a sample key: the sample is read from the shard with the
run's own domain decoders and predicted by the rule `mmdomain eval` uses (closed questions: the most likely choice;
open ones: greedy generation with the run's eval settings), so lmms-eval's scores equal `mmdomain eval`'s on the same
shards. Docs of other tasks are answered from lmms-eval's prompt and its images (``doc_to_visual``) with the task's
generation settings. Only ``generate_until`` is served (lmms-eval 0.7.3's log-likelihood path is broken for every model)."""
from __future__ import annotations

from typing import Any

import numpy as np
from lmms_eval.api.model import lmms
from tqdm import tqdm

from .data import FailureBudget, iter_records
from .evaluate import predict_records
from .generation import GenerationOptions, generate_batch
from .inference_run import load_for_inference


class MmdomainLMM(lmms):
    is_simple = True

    def __init__(self, run: str, device: str | None = None, batch_size: int | str = 8, choice_score: str | None = None,
                 max_new_tokens: int | str | None = None, dtype: str | None = None, **_: Any) -> None:
        super().__init__()
        from .recipe import Eval

        # lmms-eval passes its own --device (default "cuda" in its CLI, None from simple_evaluate); "auto" or none takes
        # the training recipe's device.
        self.run = load_for_inference(run, None if device in (None, "", "auto") else str(device), dtype)
        settings = Eval.model_validate(self.run.recipe.get("eval") or {})
        self.choice_score = choice_score or settings.choice_score
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens not in (None, "") else settings.max_new_tokens
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._shards: dict[str, dict[str, Any]] = {}

    # -- mmdomain shards ----------------------------------------------------------------------------------------

    def _record(self, shard: str, key: str) -> Any:
        if shard not in self._shards:
            if len(self._shards) >= 2:  # docs come shard by shard: keep the current and the previous one decoded
                self._shards.pop(next(iter(self._shards)))
            processor = self.run.processor
            self._shards[shard] = {r.key: r for r in iter_records([shard], processor.domains, failures=FailureBudget(10**9),
                                                                  media_token=processor.media_token)}
        try:
            return self._shards[shard][key]
        except KeyError:
            raise KeyError(f"sample {key!r} is not in {shard} (or could not be decoded there); rewrite the task with `mmdomain lmms-task`") from None

    # -- lmms-eval ----------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        ours, theirs = [], []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            if isinstance(doc, dict) and doc.get("mmdomain_shard"):
                ours.append((i, self._record(doc["mmdomain_shard"], doc["mmdomain_key"])))
            else:
                theirs.append((i, context, gen_kwargs, doc_to_visual(doc)))
        greedy = GenerationOptions(max_new_tokens=self.max_new_tokens)
        progress = tqdm(total=len(requests), desc="mmdomain", disable=self.rank != 0)
        for start in range(0, len(ours), self.batch_size):
            chunk = ours[start:start + self.batch_size]
            predictions = predict_records(self.run.model, self.run.processor, [r for _, r in chunk], self.run.device,
                                          choice_score=self.choice_score, generation=greedy)
            for (i, _), (text, _) in zip(chunk, predictions):
                answers[i] = text
            progress.update(len(chunk))
        for i, context, gen_kwargs, visuals in theirs:
            answers[i] = self._answer(context, gen_kwargs, visuals)
            progress.update(1)
        progress.close()
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), answer)
        return [a or "" for a in answers]

    def _answer(self, context: str, gen_kwargs: dict[str, Any], visuals: Any) -> str:
        processor = self.run.processor
        items = visual_arrays(visuals)
        text = " ".join([processor.media_token] * len(items) + [context])
        sample = processor([{"role": "user", "content": text}], items, key="lmms-eval", add_generation_prompt=True)
        until = gen_kwargs.get("until") or []
        options = GenerationOptions(max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                    do_sample=bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature") or 0) > 0,
                                    temperature=float(gen_kwargs.get("temperature") or 1.0) or 1.0,
                                    top_p=float(gen_kwargs.get("top_p") or 1.0), num_beams=int(gen_kwargs.get("num_beams") or 1),
                                    stop=tuple([until] if isinstance(until, str) else until))
        return generate_batch(self.run.model, processor, [sample], options, self.run.device)[0].text

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the mmdomain model serves generate_until tasks only (lmms-eval 0.7.3's log-likelihood path is broken for "
                                  "every model); closed questions of mmdomain tasks are scored by choice likelihood inside generate_until")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("the mmdomain model does not take multi-round tasks")


def visual_arrays(visuals: Any) -> list[np.ndarray]:
    """Other tasks' ``doc_to_visual`` images as arrays decoded by the rule an image file follows in mmdomain (a palette
    or RGBA image converted to RGB, 16-bit grey kept), so a dataset's PIL image and the same picture as a file give
    the model the same pixels; ``np.asarray`` of a palette image would be its palette indices."""
    from .domains.generic import image_array

    arrays = []
    for visual in [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]:
        if not hasattr(visual, "convert"):
            raise NotImplementedError(f"the mmdomain model takes images (PIL) from other tasks' doc_to_visual, got {type(visual).__name__}; "
                                      "for other media write the task with `mmdomain lmms-task` over mmdomain shards")
        arrays.append(image_array(visual))
    return arrays
