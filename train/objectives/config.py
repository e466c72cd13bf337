"""Typed settings of the objective group (`conf/objective/*.yaml`): what a step's loss is."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ObjectiveConfig:
    """`lm` (next-token cross-entropy, the mean over trained tokens) or `dpo` (Direct Preference
    Optimization on preference pairs, the mean over pairs; see train/objectives/dpo.py)."""

    kind: Literal["lm", "dpo"] = "lm"
    beta: float = 0.1
    """dpo: strength of the pull towards the reference (the DPO paper's beta; IPO's tau)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """dpo: `sigmoid` (the DPO paper's loss) or `ipo` (TRL's `ipo`: squared loss on the
    per-token mean log-ratio difference)."""
    label_smoothing: float = 0.0
    """dpo, sigmoid: the probability that a pair's labels are flipped (conservative DPO, cDPO)."""
    reference: Literal["auto", "model", "precompute"] = "auto"
    """dpo: `auto` and `model` (under an adapter: the base with the adapter disabled, no second
    copy; full fine-tuning: a frozen copy of the starting model in `model.base_dtype`, loaded and
    sharded like the policy, so a sharded rank holds only its part), `precompute` (one pass before
    training stores the reference log-probs in the run directory)."""

    def validate(self) -> list[str]:
        if self.kind == "lm":
            return []
        rules = [
            (not self.beta > 0, f"objective.beta={self.beta}: must be > 0"),
            (not 0.0 <= self.label_smoothing < 0.5,
             f"objective.label_smoothing={self.label_smoothing}: must be in [0, 0.5)"),
            (self.loss == "ipo" and self.label_smoothing > 0,
             f"objective.label_smoothing={self.label_smoothing} applies to objective.loss=sigmoid only: "
             "set it to 0 for ipo"),
        ]
        return [msg for bad, msg in rules if bad]
