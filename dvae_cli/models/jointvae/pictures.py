"""JointVAE's pictures: latent traversals (the paper's figures), a category × continuous grid, reconstructions and
prior samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dvae_cli.core.images import as_tiles, blank_tiles, grid_image, labelled_grid
from dvae_cli.core.progress import Advance
from dvae_cli.models.jointvae.model import JointVAE, kl_categorical, kl_normal
from dvae_cli.scoring.pictures import (
    Rendered,
    RenderInputs,
    batches,
    reconstructions_picture,
    to_float,
)

PRIOR_SAMPLES = 64
SAMPLE_COLUMNS = 8
TRAVERSAL_QUANTILES = (0.05, 0.95)


def traversal_values(steps: int) -> Tensor:
    """Φ⁻¹(linspace(0.05, 0.95, steps)): evenly spaced quantiles of the N(0, 1) prior."""
    quantiles = torch.linspace(*TRAVERSAL_QUANTILES, steps, dtype=torch.float64)
    return torch.distributions.Normal(0.0, 1.0).icdf(quantiles).float()


@dataclass(frozen=True)
class LatentKL:
    """KL(q ‖ prior) in nats on the measured images: per continuous dimension and per discrete variable."""

    continuous: Tensor  # [d]
    discrete: list[float]


def measure_kl(model: JointVAE, images: Tensor) -> LatentKL:
    """Batch-mean KL of each continuous dimension (posterior means and log-variances) and each discrete variable."""
    parts = [model.encode(batch) for batch in batches(images)]
    kl_z = torch.zeros(0)
    if model.continuous:
        mean = torch.cat([part["continuous_mean"] for part in parts]).cpu()
        logvar = torch.cat([part["continuous_logvar"] for part in parts]).cpu()
        kl_z = kl_normal(mean, logvar)
    kl_c: list[float] = []
    if model.discrete:
        probs = torch.cat([part["discrete_probs"] for part in parts]).cpu()
        for variable in probs.split(model.discrete, dim=1):
            kl_c.append(float(kl_categorical(variable)))
    return LatentKL(continuous=kl_z, discrete=kl_c)


def render_jointvae(model: JointVAE, inputs: RenderInputs, advance: Advance) -> Rendered:
    rendered = Rendered()
    kl = measure_kl(model, inputs.measured)
    # Stable sort: equally informative dimensions keep their index order.
    order = [int(i) for i in torch.sort(kl.continuous, descending=True, stable=True).indices]
    base = model.encode(to_float(inputs.base))
    base_z = base["continuous_mean"].cpu() if model.continuous else torch.zeros(1, 0)
    base_categories = base["discrete"].cpu() if model.discrete else torch.zeros(1, 0, dtype=torch.long)
    values = traversal_values(inputs.steps)
    columns = max([inputs.steps, *model.discrete])

    rows: list[Tensor] = []
    labels: list[list[str]] = []
    for dimension in order:
        z = base_z.repeat(inputs.steps, 1)
        z[:, dimension] = values
        rows.append(model.decode_latent(z, base_categories.repeat(inputs.steps, 1)))
        labels.append([f"z{dimension}", f"KL {float(kl.continuous[dimension]):.2f} nats"])
    for variable, categories in enumerate(model.discrete):
        chosen = base_categories.repeat(categories, 1)
        chosen[:, variable] = torch.arange(categories)
        rows.append(model.decode_latent(base_z.repeat(categories, 1), chosen))
        labels.append([f"c{variable} (k={categories})", f"KL {kl.discrete[variable]:.2f} nats"])
    if not model.continuous:
        rendered.notes.append("the model has no continuous dimension: traversals.png shows only its discrete "
                              "variables and discrete_x_continuous.png is skipped")
    if rows:
        tiles = [as_tiles(row) for row in rows]
        padded = [torch.cat([row, blank_tiles(columns - row.shape[0], row)]) for row in tiles]
        rendered.pictures["traversals.png"] = labelled_grid(torch.cat(padded), columns, labels)
    advance()

    if model.continuous and model.discrete:
        dimension, categories = order[0], model.discrete[0]
        z = base_z.repeat(categories * inputs.steps, 1)
        z[:, dimension] = values.repeat(categories)
        chosen = base_categories.repeat(categories * inputs.steps, 1)
        chosen[:, 0] = torch.arange(categories).repeat_interleave(inputs.steps)
        labels = [[f"c0 = {category}", f"z{dimension} across"] for category in range(categories)]
        rendered.pictures["discrete_x_continuous.png"] = labelled_grid(
            as_tiles(model.decode_latent(z, chosen)), inputs.steps, labels)
    elif model.continuous:
        rendered.notes.append("the model has no discrete variable: discrete_x_continuous.png is skipped")
    advance()

    rendered.pictures["reconstructions.png"] = reconstructions_picture(model, inputs.shown)
    advance()

    generator = torch.Generator().manual_seed(inputs.seed)
    z = torch.randn(PRIOR_SAMPLES, model.continuous, generator=generator)
    prior_columns = [torch.randint(categories, (PRIOR_SAMPLES,), generator=generator) for categories in model.discrete]
    categories = (torch.stack(prior_columns, dim=1) if prior_columns
                  else torch.zeros(PRIOR_SAMPLES, 0, dtype=torch.long))
    rendered.pictures["samples.png"] = grid_image(as_tiles(model.decode_latent(z, categories)), SAMPLE_COLUMNS)
    advance()
    return rendered
