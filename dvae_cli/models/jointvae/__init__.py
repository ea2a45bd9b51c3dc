"""JointVAE (Dupont, 2018): model and config, evaluation sections, pictures."""

from dvae_cli.models.jointvae.config import JointVAEConfig
from dvae_cli.models.registry import Family, Lazy

FAMILY = Family(name="jointvae", config=JointVAEConfig, model=Lazy("dvae_cli.models.jointvae.model:JointVAE"),
                metrics=Lazy("dvae_cli.models.jointvae.metrics:jointvae_metrics"),
                pictures=Lazy("dvae_cli.models.jointvae.pictures:render_jointvae"),
                picture_files=("traversals.png", "discrete_x_continuous.png", "reconstructions.png", "samples.png"))
