"""The `jointvae` params section (no torch: params are checked before any tensor library loads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dvae_cli.core.errors import UserError
from dvae_cli.core.schema import KeyName, param

MAX_CATEGORIES = 1 << 16
MAX_DISCRETE = 256


@dataclass(frozen=True)
class CapacitySchedule:
    max: float = param(help="capacity C reached at the end of the ramp, in nats", ge=0)
    steps: int = param(help="steps over which C rises linearly from 0", ge=1)
    gamma: float = param(help="weight γ of |KL − C|", ge=0)
    start: int = param(0, help="step at which the ramp starts (C is 0 before it)", ge=0)


@dataclass(frozen=True)
class JointVAEConfig:
    """The `jointvae` params section. Defaults are the quick CPU configuration; presets/ hold the paper's."""

    continuous: int = param(6, help="number of Gaussian latent dimensions (may be 0)", ge=0, le=4096)
    discrete: list[int] = param(factory=lambda: [3], help="categories of each discrete variable (each ≥ 2)")
    temperature: float = param(0.67, help="Gumbel-softmax temperature τ", gt=0)
    likelihood: Literal["bernoulli", "gaussian"] = param("bernoulli", help="bernoulli (BCE) or gaussian (MSE)")
    # γ 1 lets the decoder find the sprites within a few hundred steps; with the paper's γ 150 and a slow ramp it
    # stays on the blank image far longer than a CPU minute (presets/jointvae-dsprites.yaml has those).
    cont_capacity: CapacitySchedule = param(factory=lambda: CapacitySchedule(15.0, 1500, 1.0), help="C_z schedule")
    disc_capacity: CapacitySchedule = param(factory=lambda: CapacitySchedule(1.1, 1500, 1.0),
                                            help="C_c schedule (capped at Σ log k)")
    # Opt-in terms beside eq. 5 (their defaults give eq. 5): E_x KL(q(c|x) ‖ p(c)) = I(x; c) + KL(q(c) ‖ p(c)), and a
    # confident constant code meets C_c through the second term alone, carrying nothing about x.
    disc_capacity_of: Literal["kl", "mutual_information"] = param(
        "kl", help="what C_c controls: kl (eq. 5, E_x KL(q(c|x) ‖ p(c))) or mutual_information (its batch estimate "
                   "of I(x; c))")
    marginal_gamma: float = param(0.0, help="weight λ of KL(q(c) ‖ p(c)), the batch marginal of each discrete "
                                            "variable against its uniform prior", ge=0)
    tc_beta: float = param(0.0, help="extra weight β of TC(z) = KL(q(z) ‖ ∏_d q(z_d)), the total correlation of the "
                                     "continuous part (β-TCVAE), estimated on the batch", ge=0)
    tc_of: Literal["z", "z_and_c"] = param(
        "z", help="what TC covers: z (the continuous dimensions) or z_and_c (they and each discrete variable as one "
                  "more dimension, so that c is pushed to carry what z does not)")
    lr: float = param(1.0e-3, help="Adam learning rate", gt=0)
    batch_size: int = param(64, help="global batch size", ge=1, le=1 << 16)
    epochs: int = param(6, help="passes over the train split", ge=1)

    def validate(self, key: KeyName) -> None:
        for i, categories in enumerate(self.discrete):
            if not 2 <= categories <= MAX_CATEGORIES:
                raise UserError(f"params: `{key('discrete')}[{i}]` is {categories}; a discrete variable needs "
                                f"2 to {MAX_CATEGORIES} categories")
        if len(self.discrete) > MAX_DISCRETE:
            raise UserError(f"params: `{key('discrete')}` lists {len(self.discrete)} variables; at most "
                            f"{MAX_DISCRETE}")
        if self.continuous == 0 and not self.discrete:
            raise UserError(f"params: `{key('continuous')}` is 0 and `{key('discrete')}` is empty; "
                            "the latent needs at least one dimension")
