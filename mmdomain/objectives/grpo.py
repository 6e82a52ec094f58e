"""Group relative policy optimisation with verifiable rewards (Shao et al. 2024, DeepSeekMath): for each prompt the
current policy samples ``group_size`` answers, a verifier scores them, each answer's advantage is its reward
normalised within its group, and the policy maximises the clipped ratio objective minus a per-token KL to the frozen
reference (the k3 estimator). No value model: the group is the baseline.

One optimizer step per sampled batch: the "old" policy that sampled the answers is the policy being differentiated,
so the ratio is 1 in value (its gradient is the policy gradient) and the clip bites only if answers were reused;
``clipped_surrogate`` is written for both. Sampling draws from torch's global generator, which checkpoints save, so
a resumed run samples the same answers as one that never stopped.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

from ..processor import IGNORE, SampleError
from .logprobs import per_row, response_logprobs, tokens_per_row
from .reference import FrozenReference
from .verifiers import make_verifier

log = logging.getLogger(__name__)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Rewards ``[G * k]`` (groups of ``k`` consecutive answers) -> advantages: reward minus its group's mean, divided
    by the group's standard deviation (population, + eps) when ``scale``. A group whose answers all score the same
    gets 0 everywhere: it teaches nothing but the KL term."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """Per-token loss ``-min(r A, clip(r, 1 - eps, 1 + eps) A)`` with ``r = exp(logp - old_logp)`` (PPO's objective)."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from a token the policy sampled: ``exp(d) - d - 1`` with
    ``d = ref_logp - logp`` (Schulman's k3: unbiased, never negative)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


class PromptExamples:
    """A record -> its prompt (the conversation up to its last answer, rendered for generation), the reference answer
    and its choices; a batch repeats each prompt ``group_size`` times (left padding, as generation wants)."""

    def __init__(self, group_size: int, max_new_tokens: int, max_length: int) -> None:
        self.group_size, self.max_new_tokens, self.max_length = group_size, max_new_tokens, max_length

    def build(self, processor: Any, record: Any) -> tuple[Any, str, list[str] | None]:
        turns = record.conversations
        if not turns or turns[-1]["role"] != "assistant":
            raise SampleError(f"sample {record.key}: the conversation must end in the reference answer the verifier compares with")
        sample = processor(turns[:-1], record.media, key=record.key, add_generation_prompt=True)  # refuses media that do not fit
        if len(sample.input_ids) + self.max_new_tokens > self.max_length:
            raise SampleError(f"sample {record.key}: its prompt ({len(sample.input_ids)} tokens, media included) and "
                              f"grpo.max_new_tokens={self.max_new_tokens} exceed model.max_length={self.max_length}; raise "
                              "max_length or lower max_new_tokens")
        return sample, turns[-1]["content"], record.choices

    def collate(self, processor: Any, items: list[tuple[Any, str, list[str] | None]]) -> dict[str, Any]:
        k = self.group_size
        batch = processor.collate([sample for sample, _, _ in items for _ in range(k)], padding_side="left")
        batch["keys"] = [sample.key for sample, _, _ in items]
        batch["references"] = [reference for _, reference, _ in items for _ in range(k)]
        batch["choices"] = [choices for _, _, choices in items for _ in range(k)]
        batch["group_size"] = k
        return batch


class GRPOObjective:
    name = "grpo"
    needs_reference = True

    def __init__(self, spec: Any, *, max_length: int) -> None:
        self.spec = spec
        self.examples = PromptExamples(spec.group_size, spec.max_new_tokens, max_length)
        self.verifier = make_verifier(spec.verifier.name, spec.verifier.options)  # a wrong name fails before anything loads
        self.reference: FrozenReference | None = None
        self.tokenizer: Any = None
        self._sums: Counter[str] = Counter()  # running sums of the step metrics since the last metrics() call

    def prepare(self, model: Any, processor: Any = None) -> None:
        self.reference = FrozenReference(model)
        self.tokenizer = processor.tokenizer if processor is not None else None

    def units(self, micro: list[dict[str, Any]]) -> int:
        return sum(len(b["input_ids"]) for b in micro)  # every sampled answer counts the same

    @torch.no_grad()
    def sample(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new ids [R, T], valid [R, T])``: one sampled answer per row, valid through its first end token."""
        was_training = model.training
        model.eval()
        try:
            eos = self.tokenizer.eos_token_id
            new = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], do_sample=True,
                                 temperature=self.spec.temperature, top_p=self.spec.top_p, top_k=self.spec.top_k,
                                 max_new_tokens=self.spec.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos)
        finally:
            model.train(was_training)
        own = model.llm.generation_config.eos_token_id
        ends = {int(t) for t in ([own] if isinstance(own, int) else list(own or []))} | ({int(eos)} if eos is not None else set())
        is_end = torch.isin(new, torch.tensor(sorted(ends), device=new.device, dtype=new.dtype)) if ends else torch.zeros_like(new, dtype=torch.bool)
        valid = (torch.cumsum(is_end.long(), dim=1) - is_end.long()) == 0  # up to and including the first end token
        return new, valid

    def loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        k = batch["group_size"]
        new, valid = self.sample(model, batch)
        answers = [self.tokenizer.decode(row[mask], skip_special_tokens=True).strip() for row, mask in zip(new, valid)]
        rewards = torch.tensor([self.verifier(a, ref, choices) for a, ref, choices in zip(answers, batch["references"], batch["choices"])],
                               dtype=torch.float32, device=new.device)
        advantages = group_advantages(rewards, k, scale=self.spec.scale_rewards)

        prompt_length = batch["input_ids"].shape[1]
        mask = torch.cat([batch["attention_mask"], valid.long()], dim=1)
        labels = torch.full_like(mask, IGNORE)
        labels[:, prompt_length:] = torch.where(valid, new, torch.full_like(new, IGNORE))
        rollout = {"input_ids": torch.cat([batch["input_ids"], new], dim=1), "attention_mask": mask, "labels": labels,
                   "media": batch["media"]}
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: positions count real tokens, as generation did
        rows_total = len(new)
        with self.reference.active(model):  # before the policy's forward: the swap must not cross its graph
            ref_logp, _, _ = response_logprobs(model, rollout, position_ids=positions)
        logp, rows, _ = response_logprobs(model, rollout, position_ids=positions)
        old_logp = logp.detach()  # the sampling policy's: the same weights, see the module docstring
        kl = k3_kl(logp, ref_logp)
        per_token = clipped_surrogate(logp, old_logp, advantages[rows], self.spec.clip_eps) + self.spec.kl_beta * kl
        lengths = tokens_per_row(rows, rows_total)
        per_answer = per_row(per_token, rows, rows_total) / lengths.clamp(min=1)

        groups = rewards.view(-1, k)
        self._sums.update(answers=rows_total, groups=len(groups), reward=float(rewards.sum()),
                  reward_std=float(groups.std(dim=1, unbiased=False).sum()), equal_groups=float((groups == groups[:, :1]).all(dim=1).sum()),
                  kl=float(kl.detach().sum()), tokens=float(lengths.sum()))
        return per_answer.sum()

    def metrics(self) -> dict[str, float]:
        s, self._sums = self._sums, Counter()
        if not s.get("answers"):
            return {}
        return {"reward_mean": s["reward"] / s["answers"], "reward_std_in_group": s["reward_std"] / s["groups"],
                "equal_reward_groups": s["equal_groups"] / s["groups"], "kl_to_reference": s["kl"] / max(1.0, s["tokens"]),
                "answer_tokens": s["tokens"] / s["answers"]}

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        return None  # closed accuracy / open F1 of the eval shards is the measure
