"""The prior over code maps (the VQ-VAE paper's p(z), fitted after the autoencoder): model and config."""

from dvae_cli.models.prior.config import PriorConfig
from dvae_cli.models.registry import Lazy, PriorKind

PRIOR = PriorKind(name="prior", config=PriorConfig, model=Lazy("dvae_cli.models.prior.model:CodePrior"))
