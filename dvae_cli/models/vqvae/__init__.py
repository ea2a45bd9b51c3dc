"""VQ-VAE (van den Oord, 2017): model, quantizer and config, evaluation sections, pictures."""

from dvae_cli.models.base import Family
from dvae_cli.models.vqvae.metrics import vqvae_metrics
from dvae_cli.models.vqvae.model import VQVAE, VQVAEConfig
from dvae_cli.models.vqvae.pictures import FILES, render_vqvae

FAMILY = Family(name="vqvae", config=VQVAEConfig, model=VQVAE, metrics=vqvae_metrics,
                pictures=render_vqvae, picture_files=FILES, code_map="codes")
