import math

import pytest
import torch

from dvae_cli.core.errors import UserError
from dvae_cli.models.base import DataShape
from dvae_cli.models.jointvae.config import CapacitySchedule, JointVAEConfig
from dvae_cli.models.jointvae.model import (
    JointVAE,
    capacity,
    categorical_decomposition,
    categorical_log_density,
    continuous_decomposition,
    gaussian_log_density,
    gumbel_softmax_sample,
    kl_categorical,
    kl_normal,
    load_reference_state_dict,
    total_correlation,
)

# From shared/reference/jointvae-reference-state-dict.json, in state_dict order.
REFERENCE_MNIST_32 = {
    "img_to_features.0.weight": (32, 1, 4, 4),
    "img_to_features.0.bias": (32,),
    "img_to_features.2.weight": (64, 32, 4, 4),
    "img_to_features.2.bias": (64,),
    "img_to_features.4.weight": (64, 64, 4, 4),
    "img_to_features.4.bias": (64,),
    "features_to_hidden.0.weight": (256, 1024),
    "features_to_hidden.0.bias": (256,),
    "fc_mean.weight": (10, 256),
    "fc_mean.bias": (10,),
    "fc_log_var.weight": (10, 256),
    "fc_log_var.bias": (10,),
    "fc_alphas.0.weight": (10, 256),
    "fc_alphas.0.bias": (10,),
    "latent_to_features.0.weight": (256, 20),
    "latent_to_features.0.bias": (256,),
    "latent_to_features.2.weight": (1024, 256),
    "latent_to_features.2.bias": (1024,),
    "features_to_img.0.weight": (64, 32, 4, 4),
    "features_to_img.0.bias": (32,),
    "features_to_img.2.weight": (32, 32, 4, 4),
    "features_to_img.2.bias": (32,),
    "features_to_img.4.weight": (32, 1, 4, 4),
    "features_to_img.4.bias": (1,),
}
REFERENCE_DSPRITES_64 = {
    "img_to_features.0.weight": (32, 1, 4, 4),
    "img_to_features.0.bias": (32,),
    "img_to_features.2.weight": (32, 32, 4, 4),
    "img_to_features.2.bias": (32,),
    "img_to_features.4.weight": (64, 32, 4, 4),
    "img_to_features.4.bias": (64,),
    "img_to_features.6.weight": (64, 64, 4, 4),
    "img_to_features.6.bias": (64,),
    "features_to_hidden.0.weight": (256, 1024),
    "features_to_hidden.0.bias": (256,),
    "fc_mean.weight": (6, 256),
    "fc_mean.bias": (6,),
    "fc_log_var.weight": (6, 256),
    "fc_log_var.bias": (6,),
    "fc_alphas.0.weight": (3, 256),
    "fc_alphas.0.bias": (3,),
    "latent_to_features.0.weight": (256, 9),
    "latent_to_features.0.bias": (256,),
    "latent_to_features.2.weight": (1024, 256),
    "latent_to_features.2.bias": (1024,),
    "features_to_img.0.weight": (64, 64, 4, 4),
    "features_to_img.0.bias": (64,),
    "features_to_img.2.weight": (64, 32, 4, 4),
    "features_to_img.2.bias": (32,),
    "features_to_img.4.weight": (32, 32, 4, 4),
    "features_to_img.4.bias": (32,),
    "features_to_img.6.weight": (32, 1, 4, 4),
    "features_to_img.6.bias": (1,),
}
REFERENCE_CONFIGS = [
    pytest.param(32, 10, [10], REFERENCE_MNIST_32, id="mnist-32"),
    pytest.param(64, 6, [3], REFERENCE_DSPRITES_64, id="dsprites-64"),
]


def make_model(image_size: int = 16, continuous: int = 3, discrete: list[int] | None = None, channels: int = 1,
               **config: object) -> JointVAE:
    spec = JointVAEConfig(continuous=continuous, discrete=[3, 2] if discrete is None else discrete, **config)
    return JointVAE(spec, DataShape(channels=channels, image_size=image_size))


def random_images(count: int, image_size: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, channels, image_size, image_size, generator=generator)


def reference_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


# Loss terms


def test_kl_normal_matches_hand_computation():
    mean = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, math.log(2.0)]])
    # ½(1 + 1 − 1 − 0) = 0.5 and ½(0 + 2 − 1 − log 2)
    expected = torch.tensor([0.5, 0.5 * (1.0 - math.log(2.0))])
    torch.testing.assert_close(kl_normal(mean, logvar), expected)


def test_kl_normal_averages_over_the_batch():
    mean = torch.tensor([[2.0], [0.0]])
    logvar = torch.zeros(2, 1)
    torch.testing.assert_close(kl_normal(mean, logvar), torch.tensor([1.0]))  # (½·4 + 0) / 2


def test_kl_categorical_of_known_distributions():
    assert kl_categorical(torch.full((2, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_categorical(torch.eye(5)).item() == pytest.approx(math.log(5), abs=1e-6)
    # q = (½, ½, 0) against uniform over 3: log 3 − log 2
    assert kl_categorical(torch.tensor([[0.5, 0.5, 0.0]])).item() == pytest.approx(math.log(1.5), abs=1e-6)


def test_capacity_rises_linearly_then_holds():
    schedule = CapacitySchedule(max=10.0, steps=100, gamma=1.0)
    assert capacity(schedule, 0) == 0.0
    assert capacity(schedule, 50) == pytest.approx(5.0)
    assert capacity(schedule, 100) == pytest.approx(10.0)
    assert capacity(schedule, 1000) == pytest.approx(10.0)


def test_capacity_waits_for_its_start_step():
    schedule = CapacitySchedule(max=10.0, steps=100, gamma=1.0, start=40)
    assert [capacity(schedule, step) for step in (0, 40)] == [0.0, 0.0]
    assert capacity(schedule, 90) == pytest.approx(5.0)
    assert capacity(schedule, 140) == pytest.approx(10.0)
    assert capacity(schedule, 10**6) == pytest.approx(10.0)


def test_capacity_is_capped_at_the_ceiling():
    schedule = CapacitySchedule(max=5.0, steps=100, gamma=1.0)
    ceiling = math.log(3) + math.log(2)
    assert capacity(schedule, 10, ceiling) == pytest.approx(0.5)
    assert capacity(schedule, 50, ceiling) == pytest.approx(ceiling)
    assert capacity(schedule, 1000, ceiling) == pytest.approx(ceiling)


def test_model_capacities_follow_the_schedules_and_the_discrete_cap():
    torch.manual_seed(0)
    model = make_model(discrete=[3], cont_capacity=CapacitySchedule(40.0, 100, 1.0),
                       disc_capacity=CapacitySchedule(1.1, 100, 1.0)).eval()
    images = random_images(2)
    half = model.loss(images, 50).terms
    assert half["capacity_z"].item() == pytest.approx(20.0)
    assert half["capacity_c"].item() == pytest.approx(0.55)
    end = model.loss(images, 100).terms
    assert end["capacity_z"].item() == pytest.approx(40.0)
    assert end["capacity_c"].item() == pytest.approx(math.log(3))  # log 3 < 1.1
    assert model.loss(images, 10**6).terms["capacity_c"].item() == pytest.approx(math.log(3))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_total_loss_is_recon_plus_weighted_capacity_gaps(likelihood: str):
    torch.manual_seed(0)
    model = make_model(likelihood=likelihood, cont_capacity=CapacitySchedule(5.0, 100, 3.0),
                       disc_capacity=CapacitySchedule(1.0, 100, 7.0))
    output = model.loss(random_images(4), 30)
    terms = output.terms
    expected = (terms["recon"] + 3.0 * (terms["kl_z"] - terms["capacity_z"]).abs()
                + 7.0 * (terms["kl_c"] - terms["capacity_c"]).abs())
    torch.testing.assert_close(output.loss.detach(), expected)
    assert terms["capacity_z"].item() == pytest.approx(1.5)
    assert terms["capacity_c"].item() == pytest.approx(0.3)


def test_terms_are_named_scalars_that_add_up():
    torch.manual_seed(0)
    model = make_model(continuous=3, discrete=[3, 2])
    terms = model.loss(random_images(4), 0).terms
    expected = {"recon", "kl_z", "kl_c", "capacity_z", "capacity_c", "kl_z_0", "kl_z_1", "kl_z_2", "kl_c_0", "kl_c_1",
                "mutual_information_c", "marginal_kl_c", "mutual_information_c_0", "mutual_information_c_1",
                "marginal_kl_c_0", "marginal_kl_c_1"}
    assert set(terms) == expected
    assert all(term.shape == () and term.dtype == torch.float32 for term in terms.values())
    torch.testing.assert_close(terms["kl_z"], terms["kl_z_0"] + terms["kl_z_1"] + terms["kl_z_2"])
    torch.testing.assert_close(terms["kl_c"], terms["kl_c_0"] + terms["kl_c_1"])
    torch.testing.assert_close(terms["mutual_information_c"], terms["mutual_information_c_0"]
                               + terms["mutual_information_c_1"])
    torch.testing.assert_close(terms["kl_c"], terms["mutual_information_c"] + terms["marginal_kl_c"])


def test_categorical_decomposition_of_known_codes():
    # Two images, each certain of its own category: KL_c = log 2, all of it information about x.
    kl, information, marginal = categorical_decomposition(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert (kl.item(), information.item(), marginal.item()) == pytest.approx((math.log(2), math.log(2), 0.0), abs=1e-6)
    # A confident constant code: the same KL_c, none of it about x (the collapse eq. 5 cannot see).
    kl, information, marginal = categorical_decomposition(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert (kl.item(), information.item(), marginal.item()) == pytest.approx((math.log(2), 0.0, math.log(2)), abs=1e-6)
    # By hand: q(c|x) = (0.5, 0.5, 0) and (0.5, 0, 0.5); q(c) = (0.5, 0.25, 0.25).
    kl, information, marginal = categorical_decomposition(torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]]))
    assert kl.item() == pytest.approx(math.log(3) - math.log(2), abs=1e-6)
    assert marginal.item() == pytest.approx(math.log(3) - 1.5 * math.log(2), abs=1e-6)
    assert information.item() == pytest.approx(0.5 * math.log(2), abs=1e-6)


def test_capacity_on_mutual_information_and_the_marginal_penalty():
    torch.manual_seed(0)
    model = make_model(cont_capacity=CapacitySchedule(5.0, 100, 3.0), disc_capacity=CapacitySchedule(1.0, 100, 7.0),
                       disc_capacity_of="mutual_information", marginal_gamma=2.5)
    output = model.loss(random_images(4), 30)
    terms = output.terms
    expected = (terms["recon"] + 3.0 * (terms["kl_z"] - terms["capacity_z"]).abs()
                + 7.0 * (terms["mutual_information_c"] - terms["capacity_c"]).abs() + 2.5 * terms["marginal_kl_c"])
    torch.testing.assert_close(output.loss.detach(), expected)


def test_total_correlation_by_hand():
    def tc(z, logvar):
        return total_correlation(gaussian_log_density(z, z, logvar)).item()

    unit = torch.zeros(2, 2)
    # Two unit Gaussians at (0, 0) and (2, 2), z at their means: both coordinates move together.
    # Each point: log q(z) − Σ_d log q(z_d) = log((1 + e⁻⁴)/2) − 2 log((1 + e⁻²)/2); the 2π terms cancel.
    means = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    expected = math.log(2) + math.log1p(math.exp(-4)) - 2 * math.log1p(math.exp(-2))
    assert tc(means, unit) == pytest.approx(expected, abs=1e-6)
    # A grid of four: the batch mixture is the product of its two marginals, so TC is 0 at every point.
    grid = torch.tensor([[0.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 2.0]])
    assert tc(grid, torch.zeros(4, 2)) == pytest.approx(0.0, abs=1e-6)
    # One image, or one dimension: nothing to correlate.
    assert tc(means[:1], unit[:1]) == pytest.approx(0.0, abs=1e-6)
    assert tc(means[:, :1], unit[:, :1]) == pytest.approx(0.0, abs=1e-6)


def test_total_correlation_of_z_and_c_by_hand():
    # z one unit Gaussian at 0 or 2; c category 0 for the first image (q(c|x) = (0.8, 0.2)), 1 for the second
    # (0.2, 0.8). Each point: log q(z, c) − log q(z) − log q(c)
    # = log((0.8 + 0.2 e⁻²)/2) − log((1 + e⁻²)/2) − log(1/2).
    z = torch.tensor([[0.0], [2.0]])
    category = torch.eye(2)
    logits = torch.tensor([[0.8, 0.2], [0.2, 0.8]]).log()
    log_density = torch.cat([gaussian_log_density(z, z, torch.zeros(2, 1)), categorical_log_density(category, logits)],
                            dim=2)
    expected = math.log(0.8 + 0.2 * math.exp(-2)) - math.log1p(math.exp(-2)) + math.log(2)
    assert total_correlation(log_density).item() == pytest.approx(expected, abs=1e-6)
    # A category that says nothing about the image (both rows (0.5, 0.5)) correlates with nothing.
    flat = torch.cat([gaussian_log_density(z, z, torch.zeros(2, 1)),
                      categorical_log_density(category, torch.zeros(2, 2))], dim=2)
    assert total_correlation(flat).item() == pytest.approx(0.0, abs=1e-6)


def test_continuous_decomposition_by_hand():
    # Unit Gaussians at (0, 0) and (2, 2), z at their means: log q(z_i|x_i) − log q(z_i) = −log((1 + e⁻⁴)/2) at
    # each point; KL_z = ½ (0 + 8) / 2 = 2 nats, the rest of it marginal.
    means = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    kl, information, marginal = continuous_decomposition(means, means, torch.zeros(2, 2))
    assert information.item() == pytest.approx(math.log(2) - math.log1p(math.exp(-4)), abs=1e-6)
    assert (kl.item(), marginal.item()) == pytest.approx((2.0, 2.0 - information.item()), abs=1e-6)
    # One image: nothing about x to carry, all of KL_z is marginal.
    kl, information, marginal = continuous_decomposition(means[1:], means[1:], torch.zeros(1, 2))
    assert (kl.item(), information.item(), marginal.item()) == pytest.approx((4.0, 0.0, 4.0), abs=1e-6)


def test_tc_beta_adds_the_total_correlation():
    def eq5(model, terms):
        return (terms["recon"] + model.config.cont_capacity.gamma * (terms["kl_z"] - terms["capacity_z"]).abs()
                + model.config.disc_capacity.gamma * (terms["kl_c"] - terms["capacity_c"]).abs())

    torch.manual_seed(0)
    for tc_of, name in (("z", "total_correlation_z"), ("z_and_c", "total_correlation_zc")):
        model = make_model(tc_beta=4.0, tc_of=tc_of).eval()
        output = model.loss(random_images(4), 30)
        torch.testing.assert_close(output.loss.detach(), eq5(model, output.terms) + 4.0 * output.terms[name])
    assert "total_correlation_z" not in make_model().loss(random_images(4), 30).terms


def test_kl_terms_match_the_encoded_posterior():
    torch.manual_seed(0)
    model = make_model(continuous=2, discrete=[3, 2]).eval()
    images = random_images(3)
    latent = model.encode(images)
    terms = model.loss(images, 0).terms
    mean, logvar = latent["continuous_mean"], latent["continuous_logvar"]
    hand_kl_z = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(1).mean()
    torch.testing.assert_close(terms["kl_z"], hand_kl_z)
    probs = latent["discrete_probs"]
    hand_kl_c = sum(math.log(k) + (p * p.log()).sum(1).mean() for p, k in ((probs[:, :3], 3), (probs[:, 3:], 2)))
    torch.testing.assert_close(terms["kl_c"], hand_kl_c)


def test_recon_matches_hand_computation_in_eval_mode():
    torch.manual_seed(0)
    images = random_images(3)
    bernoulli = make_model(likelihood="bernoulli").eval()
    output = bernoulli.loss(images, 0)
    r = output.reconstruction.double()
    x = images.double()
    hand_bce = -(x * r.log() + (1 - x) * (1 - r).log()).sum() / 3
    assert output.terms["recon"].item() == pytest.approx(hand_bce.item(), rel=1e-4)

    gaussian = make_model(likelihood="gaussian").eval()
    output = gaussian.loss(images, 0)
    hand_squared_error = (output.reconstruction - images).pow(2).sum() / 3
    assert output.terms["recon"].item() == pytest.approx(hand_squared_error.item(), rel=1e-5)


@pytest.mark.parametrize(("continuous", "discrete"), [(0, [3, 2]), (4, [])])
def test_a_missing_latent_part_adds_nothing(continuous: int, discrete: list[int]):
    torch.manual_seed(0)
    model = make_model(continuous=continuous, discrete=discrete)
    output = model.loss(random_images(4), 50)
    assert torch.isfinite(output.loss)
    missing = "z" if continuous == 0 else "c"
    assert output.terms[f"kl_{missing}"].item() == 0.0
    assert output.terms[f"capacity_{missing}"].item() == 0.0
    output.loss.backward()


# Gumbel-softmax


def test_gumbel_softmax_samples_are_distributions():
    torch.manual_seed(0)
    samples = gumbel_softmax_sample(torch.randn(100, 5), temperature=0.67)
    assert (samples >= 0).all()
    torch.testing.assert_close(samples.sum(1), torch.ones(100))


def test_gumbel_softmax_samples_become_one_hot_as_temperature_falls():
    torch.manual_seed(0)
    logits = torch.randn(200, 4)
    soft = gumbel_softmax_sample(logits, temperature=5.0)
    cold = gumbel_softmax_sample(logits, temperature=1e-3)
    assert soft.max(1).values.mean() < 0.6
    assert (cold.max(1).values > 0.999).float().mean() > 0.98
    torch.testing.assert_close(cold.sum(1), torch.ones(200))


def test_gumbel_max_categories_follow_the_softmax():
    torch.manual_seed(0)
    probs = torch.tensor([0.6, 0.3, 0.1])
    samples = gumbel_softmax_sample(probs.log().expand(20000, 3), temperature=0.5)
    frequencies = torch.bincount(samples.argmax(1), minlength=3).float() / 20000
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)


# Shapes and architecture


@pytest.mark.parametrize("image_size", [16, 32, 64, 128])
@pytest.mark.parametrize(("continuous", "discrete"), [(0, [2, 5, 3]), (4, []), (6, [3])])
def test_output_shapes(image_size: int, continuous: int, discrete: list[int]):
    torch.manual_seed(0)
    model = make_model(image_size, continuous, discrete, channels=3)
    images = random_images(2, image_size, channels=3)
    output = model.loss(images, 0)
    assert output.reconstruction.shape == images.shape
    latent = model.encode(images)
    expected_keys = set()
    if continuous:
        expected_keys |= {"continuous_mean", "continuous_logvar"}
        assert latent["continuous_mean"].shape == (2, continuous)
        assert latent["continuous_logvar"].shape == (2, continuous)
    if discrete:
        expected_keys |= {"discrete_probs", "discrete"}
        assert latent["discrete_probs"].shape == (2, sum(discrete))
        assert latent["discrete"].shape == (2, len(discrete))
        assert latent["discrete"].dtype == torch.int64
    assert set(latent) == expected_keys
    assert model.decode(latent).shape == images.shape
    prior = model.sample_prior(3)
    assert prior.shape == (3, 3, image_size, image_size)
    assert ((prior >= 0) & (prior <= 1)).all()
    assert model.latent_attributes() == {"continuous": continuous, "discrete": discrete}


def test_discrete_probs_are_per_variable_distributions_and_argmax_matches():
    torch.manual_seed(0)
    model = make_model(continuous=1, discrete=[3, 2, 4])
    latent = model.encode(random_images(5))
    per_variable = latent["discrete_probs"].split([3, 2, 4], dim=1)
    for j, probs in enumerate(per_variable):
        torch.testing.assert_close(probs.sum(1), torch.ones(5))
        assert torch.equal(probs.argmax(1), latent["discrete"][:, j])


@pytest.mark.parametrize(("image_size", "continuous", "discrete", "shapes"), REFERENCE_CONFIGS)
def test_state_dict_equals_the_reference(image_size, continuous, discrete, shapes):
    model = make_model(image_size, continuous, discrete)
    assert [(name, tuple(t.shape)) for name, t in model.state_dict().items()] == list(shapes.items())


@pytest.mark.parametrize(("image_size", "continuous", "discrete", "shapes"), REFERENCE_CONFIGS)
def test_reference_state_dict_loads(image_size, continuous, discrete, shapes):
    model = make_model(image_size, continuous, discrete)
    weights = reference_state_dict(shapes)
    load_reference_state_dict(model, weights)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name])


def test_reference_state_dict_mismatches_are_user_errors():
    model = make_model(32, 10, [10])
    wrong_shape = reference_state_dict(REFERENCE_MNIST_32)
    wrong_shape["fc_alphas.0.weight"] = torch.zeros(3, 256)
    with pytest.raises(UserError, match=r"fc_alphas\.0\.weight.*\(3, 256\)"):
        load_reference_state_dict(model, wrong_shape)
    missing = reference_state_dict(REFERENCE_MNIST_32)
    del missing["fc_mean.bias"]
    with pytest.raises(UserError, match=r"fc_mean\.bias"):
        load_reference_state_dict(model, missing)
    extra = reference_state_dict(REFERENCE_MNIST_32) | {"fc_alphas.1.weight": torch.zeros(2, 256)}
    with pytest.raises(UserError, match=r"fc_alphas\.1\.weight"):
        load_reference_state_dict(model, extra)


@pytest.mark.parametrize("image_size", [48, 8, 12])
def test_unsupported_image_size_is_a_user_error(image_size: int):
    with pytest.raises(UserError, match="power of two"):
        make_model(image_size)


# Modes and numerics


def test_evaluation_mode_is_deterministic_and_reconstruct_is_decode_of_encode():
    torch.manual_seed(0)
    model = make_model().eval()
    images = random_images(4)
    first, second = model.loss(images, 10), model.loss(images, 10)
    assert torch.equal(first.loss, second.loss)
    assert torch.equal(first.reconstruction, second.reconstruction)
    reconstruction = model.reconstruct(images)
    assert torch.equal(reconstruction, model.decode(model.encode(images)))
    torch.testing.assert_close(reconstruction, first.reconstruction)


def test_training_mode_samples_from_the_global_rng():
    model = make_model()
    images = random_images(4)
    torch.manual_seed(3)
    first = model.loss(images, 0).loss
    torch.manual_seed(3)
    assert torch.equal(model.loss(images, 0).loss, first)
    assert not torch.equal(model.loss(images, 0).loss, first)


def test_decode_latent_uses_the_categories_and_continuous_values():
    torch.manual_seed(0)
    model = make_model(continuous=2, discrete=[3])
    z = torch.zeros(3, 2)
    images = model.decode_latent(z, torch.tensor([[0], [1], [2]], dtype=torch.uint8))
    assert images.shape == (3, 1, 16, 16)
    assert not torch.equal(images[0], images[1])
    latent = {"continuous_mean": z, "discrete": torch.tensor([[0], [1], [2]])}
    torch.testing.assert_close(model.decode(latent), images)


def test_decode_without_a_needed_part_is_a_user_error():
    model = make_model(continuous=2, discrete=[3])
    with pytest.raises(UserError, match="discrete"):
        model.decode({"continuous_mean": torch.zeros(2, 2)})


def test_sample_prior_uses_the_global_rng():
    model = make_model()
    torch.manual_seed(5)
    first = model.sample_prior(4)
    torch.manual_seed(5)
    assert torch.equal(model.sample_prior(4), first)


def test_channels_last_input_gives_the_same_loss():
    torch.manual_seed(0)
    model = make_model(channels=3).eval()
    images = random_images(4, channels=3)
    contiguous = model.loss(images, 0)
    channels_last = model.loss(images.contiguous(memory_format=torch.channels_last), 0)
    torch.testing.assert_close(channels_last.loss, contiguous.loss, rtol=1e-5, atol=1e-4)


def test_bf16_autocast_keeps_loss_terms_in_float32():
    torch.manual_seed(0)
    model = make_model()
    images = random_images(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model.loss(images, 10)
        latent = model.encode(images)
    assert output.loss.dtype == torch.float32
    assert torch.isfinite(output.loss)
    assert all(term.dtype == torch.float32 for term in output.terms.values())
    assert output.reconstruction.dtype == torch.float32
    assert latent["continuous_mean"].dtype == torch.float32
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = make_model(cont_capacity=CapacitySchedule(1.0, 10, 1.0), disc_capacity=CapacitySchedule(0.5, 10, 1.0))
    squares = torch.zeros(8, 1, 16, 16)
    for i in range(8):
        squares[i, 0, i:i + 6, 4:10] = 1.0
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = model.eval().loss(squares, 100).loss.item()
    model.train()
    for step in range(10):
        optimizer.zero_grad()
        model.loss(squares, step).loss.backward()
        optimizer.step()
    assert model.eval().loss(squares, 100).loss.item() < 0.7 * before
