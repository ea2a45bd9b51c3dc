from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvae_cli.core.errors import UserError
from dvae_cli.models.base import DataShape
from dvae_cli.models.vqvae.config import VQVAEConfig
from dvae_cli.models.vqvae.model import VQVAE


def tiny_config(**overrides: object) -> VQVAEConfig:
    settings: dict[str, object] = {"hidden": 16, "res_blocks": 1, "downsample": 4, "num_codes": 16, "code_dim": 4}
    settings.update(overrides)
    return VQVAEConfig(**settings)  # type: ignore[arg-type]


def disc_images(count: int, size: int, seed: int) -> torch.Tensor:
    """Binary images [count, 1, size, size] of one filled disc each, at a random centre and radius."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    centres = rng.uniform(3, size - 3, (count, 2))
    radii = rng.uniform(2, size / 4, count)
    squared_distance = (rows - centres[:, 0, None, None]) ** 2 + (cols - centres[:, 1, None, None]) ** 2
    inside = squared_distance <= radii[:, None, None] ** 2
    return torch.from_numpy(inside.astype(np.float32)).unsqueeze(1)


def initialised_model(config: VQVAEConfig, data: DataShape, images: torch.Tensor) -> VQVAE:
    """A model whose codebook k-means initialisation has run on `images`, in evaluation mode."""
    torch.manual_seed(0)
    model = VQVAE(config, data)
    model.loss(images, step=0)
    return model.eval()


@pytest.mark.parametrize("downsample", [2, 4, 8])
def test_shapes_follow_downsample(downsample: int) -> None:
    torch.manual_seed(0)
    model = VQVAE(tiny_config(downsample=downsample), DataShape(channels=3, image_size=16, pixel_variance=0.1))
    images = torch.rand(2, 3, 16, 16)
    output = model.loss(images, step=0)
    side = 16 // downsample
    assert output.reconstruction.shape == images.shape
    assert model.codes(images).shape == (2, side, side)
    assert model.codes(images).dtype == torch.int64
    assert model.decode_codes(model.codes(images)).shape == images.shape
    assert output.counts["code_usage"].shape == (16,)
    assert int(output.counts["code_usage"].sum()) == 2 * side * side
    assert model.latent_attributes() == {"latent_shape": [side, side], "num_codes": 16, "code_dim": 4}
    assert model.codebook().shape == (16, 4) and model.codebook().dtype == torch.float32


def test_first_stage_is_half_width_only_with_several_stages() -> None:
    data = DataShape(channels=1, image_size=16)
    single = VQVAE(tiny_config(downsample=2), data)
    several = VQVAE(tiny_config(downsample=8), data)
    assert single.encoder[0].out_channels == 16
    assert several.encoder[0].out_channels == 8
    assert [m.out_channels for m in several.decoder if isinstance(m, torch.nn.ConvTranspose2d)] == [16, 8, 1]


def test_straight_through_gradient_reaches_encoder() -> None:
    # β = 0 and EMA updates: the loss is the reconstruction term alone, so the encoder's only gradient
    # path is the straight-through copy across the quantizer.
    torch.manual_seed(0)
    model = VQVAE(tiny_config(beta=0.0), DataShape(channels=1, image_size=16, pixel_variance=0.2))
    images = disc_images(4, 16, seed=1)
    output = model.loss(images, step=0)
    assert torch.equal(output.loss, output.terms["recon"])
    output.loss.backward()
    for parameter in model.encoder.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_decode_codes_equals_evaluation_reconstruction_exactly() -> None:
    images = disc_images(8, 16, seed=2)
    model = initialised_model(tiny_config(), DataShape(channels=1, image_size=16, pixel_variance=0.2), images)
    from_codes = model.decode_codes(model.codes(images))
    with torch.no_grad():
        from_loss = model.loss(images, step=1).reconstruction
    assert torch.equal(from_codes, from_loss)
    assert torch.equal(model.reconstruct(images), from_codes)
    assert torch.equal(model.decode(model.encode(images)), from_codes)


def test_channels_last_input_gives_the_same_codes() -> None:
    images = disc_images(4, 16, seed=3)
    model = initialised_model(tiny_config(), DataShape(channels=1, image_size=16, pixel_variance=0.2), images)
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(model.codes(channels_last), model.codes(images))
    torch.testing.assert_close(model.reconstruct(channels_last), model.reconstruct(images))


@pytest.mark.parametrize("update", ["loss", "ema"])
def test_gaussian_loss_matches_hand_computation(update: str) -> None:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    variance = 0.07
    model = initialised_model(tiny_config(codebook_update=update, beta=0.3),
                              DataShape(channels=3, image_size=16, pixel_variance=variance), images)
    with torch.no_grad():
        output = model.loss(images, step=1)
        z_e = model.encoder(images)
        z_q = model.quantizer.lookup(model.codes(images))
        decoded = model.decoder(z_q)
    recon = ((decoded - images) ** 2).mean() / variance
    squared_error = ((z_e - z_q) ** 2).mean()
    codebook = squared_error if update == "loss" else torch.tensor(0.0)
    torch.testing.assert_close(output.terms["recon"], recon)
    torch.testing.assert_close(output.terms["commitment"], 0.3 * squared_error)
    torch.testing.assert_close(output.terms["codebook"], codebook)
    torch.testing.assert_close(output.loss, recon + codebook + 0.3 * squared_error)
    torch.testing.assert_close(output.reconstruction, decoded.clamp(0, 1))


def test_bernoulli_loss_is_mean_binary_cross_entropy_with_logits() -> None:
    images = disc_images(4, 16, seed=5)
    model = initialised_model(tiny_config(likelihood="bernoulli"), DataShape(channels=1, image_size=16), images)
    with torch.no_grad():
        output = model.loss(images, step=1)
        logits = model.decoder(model.quantizer.lookup(model.codes(images)))
    torch.testing.assert_close(output.terms["recon"], F.binary_cross_entropy_with_logits(logits, images))
    torch.testing.assert_close(output.reconstruction, torch.sigmoid(logits))
    assert torch.equal(model.decode_codes(model.codes(images)), output.reconstruction)


def test_pixel_variance_is_saved_and_restored_with_the_weights() -> None:
    model = VQVAE(tiny_config(), DataShape(channels=1, image_size=16, pixel_variance=0.125))
    state = model.state_dict()
    assert state["pixel_variance"].dtype == torch.float32
    assert float(state["pixel_variance"]) == 0.125
    restored = VQVAE(tiny_config(), DataShape(channels=1, image_size=16))
    restored.load_state_dict(state)
    assert float(restored.pixel_variance) == 0.125


@pytest.mark.parametrize(("image_size", "downsample"), [(16, 32), (24, 16), (20, 8)])
def test_code_map_that_does_not_fit_is_a_user_error(image_size: int, downsample: int) -> None:
    with pytest.raises(UserError, match="downsample"):
        VQVAE(tiny_config(downsample=downsample), DataShape(channels=1, image_size=image_size))


def test_gaussian_loss_needs_pixel_variance() -> None:
    with pytest.raises(UserError, match="pixel variance"):
        VQVAE(tiny_config(), DataShape(channels=1, image_size=16, pixel_variance=0.0))


def test_bf16_autocast_gives_float_loss() -> None:
    torch.manual_seed(0)
    model = VQVAE(tiny_config(), DataShape(channels=1, image_size=16, pixel_variance=0.2))
    images = disc_images(4, 16, seed=6).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        output = model.loss(images, step=0)
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)
    assert output.reconstruction.dtype == torch.float32
    output.loss.backward()


def test_epoch_logs_report_codebook_health() -> None:
    model = VQVAE(tiny_config(num_codes=4, dead_code_threshold=1.0), DataShape(channels=1, image_size=16))
    with torch.no_grad():
        model.quantizer.cluster_size.copy_(torch.tensor([5.0, 0.5, 2.0, 0.0]))
        model.quantizer.restart_count.fill_(7)
    logs = model.epoch_logs({"code_usage": torch.tensor([3, 0, 1, 0])})
    assert logs == {"codes_used_fraction": 0.5, "dead_codes": 2.0, "restarts": 7.0}
    without_restarts = VQVAE(tiny_config(num_codes=4, dead_code_threshold=0.0), DataShape(channels=1, image_size=16))
    assert without_restarts.epoch_logs({"code_usage": torch.tensor([3, 0, 0, 1])})["dead_codes"] == 2.0


def test_short_training_lowers_loss_and_keeps_codes_in_use() -> None:
    torch.manual_seed(0)
    images = disc_images(256, 16, seed=7)
    # EMA decay 0.9: usage of an abandoned code falls below the restart threshold within ~20 steps
    # (~200 at the default 0.99), so dead-code restarts act within this 160-step run.
    config = tiny_config(hidden=32, num_codes=64, code_dim=8, likelihood="bernoulli", ema_decay=0.9)
    model = VQVAE(config, DataShape(channels=1, image_size=16))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch_size, epochs = 32, 20
    losses: list[float] = []
    usage = torch.zeros(64, dtype=torch.int64)
    for _ in range(epochs):
        usage.zero_()
        for batch in torch.randperm(len(images)).split(batch_size):
            output = model.loss(images[batch], step=len(losses))
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
            losses.append(output.loss.item())
            usage += output.counts["code_usage"]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert model.epoch_logs({"code_usage": usage})["codes_used_fraction"] >= 0.5
