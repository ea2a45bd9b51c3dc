"""VQ-VAE (van den Oord, 2017): model, quantizer and config, evaluation sections, pictures."""

from dvae_cli.models.registry import Family, Lazy
from dvae_cli.models.vqvae.config import VQVAEConfig

FAMILY = Family(name="vqvae", config=VQVAEConfig, model=Lazy("dvae_cli.models.vqvae.model:VQVAE"),
                metrics=Lazy("dvae_cli.models.vqvae.metrics:vqvae_metrics"),
                pictures=Lazy("dvae_cli.models.vqvae.pictures:render_vqvae"),
                picture_files=("reconstructions.png", "code_maps.png", "codebook.png", "code_usage.csv"),
                code_map="codes")
