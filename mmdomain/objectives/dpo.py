"""Direct preference optimisation: each (prompt, chosen, rejected) pair moves the policy's log-likelihood ratio to the
frozen reference up on the chosen answer and down on the rejected one (Rafailov et al. 2023), with optional SFT
mixing on the chosen answer. Only response tokens count; the media and the prompt are the same for both rows."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from ..processor import SampleError
from .logprobs import per_row, response_logprobs, tokens_per_row
from .reference import FrozenReference

log = logging.getLogger(__name__)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair ``(loss, reward margin)`` from summed response log-probs: margin = beta * ((pi_c - ref_c) - (pi_r - ref_r)),
    loss = -log sigmoid(margin)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


class PairExamples:
    """A record with a rejected answer -> (chosen row, rejected row), both with the record's media; a batch holds the
    chosen rows first, then the rejected rows in the same order (``pairs`` says how many)."""

    def build(self, processor: Any, record: Any) -> tuple[Any, Any]:
        turns = record.conversations
        if record.rejected is None:
            raise SampleError(f"sample {record.key}: no rejected answer; objective dpo trains from preference pairs (make-shards "
                              "lines with prompt, chosen and rejected)")
        if not turns or turns[-1]["role"] != "assistant":
            raise SampleError(f"sample {record.key}: the conversation must end in the chosen answer")
        rejected = [*turns[:-1], {"role": "assistant", "content": record.rejected}]
        # The processor refuses a sample whose media would not fit max_length (never cut through a media block); a long
        # answer loses its end, which the two rows then compare as cut.
        return processor(turns, record.media, key=record.key), processor(rejected, record.media, key=record.key)

    def collate(self, processor: Any, pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
        batch = processor.collate([c for c, _ in pairs] + [r for _, r in pairs])
        batch["pairs"] = len(pairs)
        batch["keys"] = batch["keys"][: len(pairs)]
        return batch


class DPOObjective:
    name = "dpo"
    needs_reference = True

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.examples = PairExamples()
        self.reference: FrozenReference | None = None
        self._sums: Counter[str] = Counter()  # running sums of the step metrics since the last metrics() call

    def prepare(self, model: Any, processor: Any = None) -> None:
        self.reference = FrozenReference(model)

    def units(self, micro: list[dict[str, Any]]) -> int:
        return sum(b["pairs"] for b in micro)

    def pair_scores(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Summed response log-probs of policy and reference per row, and the per-token KL(policy || reference) over
        the vocabulary at every response position (exact, not a sampled estimate)."""
        n = len(batch["input_ids"])
        with self.reference.active(model):  # before the policy's forward: the swap must not cross its graph
            ref_token, ref_rows, ref_all = response_logprobs(model, batch, full=True)
        token, rows, logp_all = response_logprobs(model, batch, full=True)
        kl = (logp_all.exp() * (logp_all - ref_all)).sum(-1).detach()
        return {"policy": per_row(token, rows, n), "reference": per_row(ref_token, ref_rows, n), "tokens": tokens_per_row(rows, n),
                "kl": kl}

    def loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        pairs = batch["pairs"]
        scores = self.pair_scores(model, batch)
        policy, reference = scores["policy"], scores["reference"]
        losses, margin = dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.spec.beta)
        total = losses.sum()
        chosen_nll = -(policy[:pairs] / scores["tokens"][:pairs].clamp(min=1))
        if self.spec.sft_weight:
            total = total + self.spec.sft_weight * chosen_nll.sum()
        margin = margin.detach()
        rewards = self.spec.beta * (policy - reference).detach()
        self._sums.update(pairs=pairs, reward_margin=float(margin.sum()), preference_accuracy=float((margin > 0).sum() + 0.5 * (margin == 0).sum()),
                  reward_chosen=float(rewards[:pairs].sum()), reward_rejected=float(rewards[pairs:].sum()),
                  chosen_nll=float(chosen_nll.detach().sum()), kl_tokens=len(scores["kl"]), kl=float(scores["kl"].sum()))
        return total

    def metrics(self) -> dict[str, float]:
        s, self._sums = self._sums, Counter()
        if not s.get("pairs"):
            return {}
        pairs = s["pairs"]
        out = {name: s[name] / pairs for name in ("reward_margin", "preference_accuracy", "reward_chosen", "reward_rejected", "chosen_nll")}
        out["kl_to_reference"] = s["kl"] / max(1, s["kl_tokens"])
        return out

    @torch.no_grad()
    def evaluate(self, model: Any, processor: Any, patterns: Any, layout: Any, recipe: Any) -> dict[str, Any] | None:
        """Held-out preference accuracy: pairs whose implicit reward margin is positive (a tie counts half, so the
        start model scores 0.5), and how often the policy itself gives the chosen answer the higher likelihood."""
        return preference_report(self, model, processor, patterns, layout=layout, max_samples=recipe.eval.max_samples,
                                 batch_size=recipe.eval.batch_size, error_budget=recipe.data.decode_error_budget)


def preference_report(objective: DPOObjective, model: Any, processor: Any, patterns: Any, *, layout: Any = None,
                      max_samples: int | None = None, batch_size: int = 16, error_budget: int = 10) -> dict[str, Any] | None:
    """Preference metrics of ``model`` on the pairs in ``patterns`` (records without a rejected answer are left out);
    None when the shards hold no pair."""
    from ..data import FailureBudget, SampleFormat, expand_shards, iter_records
    from ..evaluate import to_device

    device = model.causal_lm.get_input_embeddings().weight.device
    failures = FailureBudget(error_budget)
    was_training = model.training
    model.eval()
    margins, likelier, chunk, seen = [], [], [], 0
    records = iter_records(expand_shards(patterns), processor.domains, failures=failures, layout=layout or SampleFormat(),
                           media_token=processor.media_token)

    def flush() -> None:
        batch = to_device(objective.examples.collate(processor, chunk), device)
        scores = objective.pair_scores(model, batch)
        n = len(chunk)
        policy, reference = scores["policy"], scores["reference"]
        margins.extend(dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], objective.spec.beta)[1].tolist())
        likelier.extend((policy[:n] > policy[n:]).tolist())
        chunk.clear()

    for record in records:
        if max_samples is not None and seen >= max_samples:
            break
        if record.rejected is None:
            continue
        seen += 1
        try:
            chunk.append(objective.examples.build(processor, record))
        except SampleError as exc:
            failures.record(record.key, str(exc))
        if len(chunk) >= batch_size:
            flush()
    if chunk:
        flush()
    model.train(was_training)
    if not margins:
        return None
    return {"pairs": len(margins), "accuracy": sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins),
            "reward_margin": sum(margins) / len(margins), "policy_prefers_chosen": sum(likelier) / len(likelier),
            "skipped_samples": failures.total}
