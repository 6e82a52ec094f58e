"""The recipe's stage-3 blocks: what `objective: dpo` and `objective: grpo` train with (typed, no torch)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DPOSpec(_Strict):
    """Direct preference optimisation (Rafailov et al. 2023) against the frozen stage-2 model."""

    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference: the implicit reward is "
                        "beta * (log pi - log pi_ref) of the response")
    sft_weight: float = Field(0.0, ge=0, description="adds this times the chosen answer's mean token NLL (RPO-style SFT mixing; "
                              "keeps the chosen answer's likelihood from falling with the rejected one's)")
    reference: Literal["init"] = Field("init", description="the frozen reference: the model as the stage starts (init_from's "
                                       "weights); with fresh LLM LoRA adapters only, the adapters switched off")


class VerifierSpec(_Strict):
    """A reward function by registry name (``mmdomain.objectives.verifiers``; packages add their own under the
    ``mmdomain.verifiers`` entry-point group) and its options."""

    name: str = "exact_choice"
    options: dict[str, Any] = Field(default_factory=dict)


class GRPOSpec(_Strict):
    """Group relative policy optimisation (Shao et al. 2024) with a verifiable reward."""

    group_size: int = Field(4, ge=2, description="answers sampled per prompt; advantages are rewards normalised within the group")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    max_new_tokens: int = Field(32, ge=1)
    clip_eps: float = Field(0.2, gt=0, lt=1, description="the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps]")
    kl_beta: float = Field(0.04, ge=0, description="weight of the per-token KL to the frozen reference (k3 estimator)")
    scale_rewards: bool = Field(True, description="divide group-centred rewards by the group's standard deviation (false: "
                                "centred only, as Dr. GRPO argues)")
    verifier: VerifierSpec = Field(default_factory=VerifierSpec)
