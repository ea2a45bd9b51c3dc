"""JointVAE (Dupont, 2018): model and config, evaluation sections, pictures."""

from dvae_cli.models.base import Family
from dvae_cli.models.jointvae.metrics import jointvae_metrics
from dvae_cli.models.jointvae.model import JointVAE, JointVAEConfig
from dvae_cli.models.jointvae.pictures import FILES, render_jointvae

FAMILY = Family(name="jointvae", config=JointVAEConfig, model=JointVAE, metrics=jointvae_metrics,
                pictures=render_jointvae, picture_files=FILES)
