"""dvae: discrete representations of image datasets (JointVAE, VQ-VAE) as a DVC pipeline."""

__version__ = "0.1.0"
