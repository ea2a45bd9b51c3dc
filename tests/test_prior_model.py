"""The prior over code maps (`models.prior`): its NLL against hand-built distributions' entropy, its sampler."""

from __future__ import annotations

import math

import pytest
import torch

from dvae_cli.models.prior.config import CodeMaps, PriorConfig
from dvae_cli.models.prior.model import CodePrior, start_tokens, training_rows

PROBABILITIES = torch.tensor([0.5, 0.25, 0.125, 0.125])
"""i.i.d. codes with this distribution have an entropy of 1.75 bits each."""


def fit_prior(maps: CodeMaps, rows: torch.Tensor, steps: int = 250) -> CodePrior:
    torch.manual_seed(0)
    model = CodePrior(PriorConfig(width=32, layers=1, heads=2, lr=1e-2), maps)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = rows[torch.randint(len(rows), (128,))]
        loss = model.loss(batch, step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def iid_prior() -> tuple[CodePrior, CodeMaps, torch.Tensor]:
    maps = CodeMaps(height=2, width=3, num_codes=4)
    generator = torch.Generator().manual_seed(1)
    codes = torch.multinomial(PROBABILITIES, 4000 * maps.length, replacement=True, generator=generator)
    rows = training_rows(maps, codes.view(4000, 2, 3), None)
    return fit_prior(maps, rows[:3000]), maps, rows[3000:]


def test_nll_of_iid_codes_matches_their_entropy(iid_prior: tuple[CodePrior, CodeMaps, torch.Tensor]) -> None:
    model, maps, test_rows = iid_prior
    entropy = -(PROBABILITIES * PROBABILITIES.log2()).sum().item()
    assert entropy == pytest.approx(1.75)
    with torch.no_grad():
        bits_per_code = model.code_nll(test_rows).mean().item() / math.log(2)
    assert bits_per_code == pytest.approx(entropy, abs=0.04)


def test_nll_of_repeated_codes_is_the_first_codes_entropy() -> None:
    """Maps that repeat their first code (uniform over K = 4): 2 bits a map, so the prior must use the context."""
    maps = CodeMaps(height=1, width=4, num_codes=4)
    first = torch.randint(4, (2000,), generator=torch.Generator().manual_seed(2))
    rows = training_rows(maps, first[:, None, None].expand(-1, 1, 4), None)
    model = fit_prior(maps, rows[:1500], steps=200)
    with torch.no_grad():
        bits_per_map = model.code_nll(rows[1500:]).sum(dim=1).mean().item() / math.log(2)
    assert bits_per_map == pytest.approx(2.0, abs=0.05)


def test_an_untrained_prior_costs_about_log2_k_bits_a_code() -> None:
    maps = CodeMaps(height=4, width=4, num_codes=64)
    torch.manual_seed(0)
    model = CodePrior(PriorConfig(width=32, layers=2, heads=4), maps)
    rows = training_rows(maps, torch.randint(64, (16, 4, 4)), None)
    assert model.loss(rows, 0).terms["bits_per_code"].item() == pytest.approx(6.0, abs=0.1)


def test_samples_follow_the_learned_distribution(iid_prior: tuple[CodePrior, CodeMaps, torch.Tensor]) -> None:
    model, maps, _ = iid_prior
    uniforms = torch.rand(3000, maps.length, generator=torch.Generator().manual_seed(3))
    codes = model.sample(start_tokens(maps, None, 3000), uniforms)
    assert codes.shape == (3000, 2, 3)
    frequencies = torch.bincount(codes.flatten(), minlength=4).float() / codes.numel()
    assert torch.allclose(frequencies, PROBABILITIES, atol=0.02)


def test_cached_and_uncached_sampling_draw_the_same_codes() -> None:
    maps = CodeMaps(height=4, width=4, num_codes=16, num_classes=3)
    torch.manual_seed(0)
    model = CodePrior(PriorConfig(width=32, layers=2, heads=4), maps).eval()
    for parameter in model.parameters():  # a prior far from uniform, so the draws depend on the context
        parameter.data.normal_(0, 0.5)
    starts = start_tokens(maps, torch.tensor([0, 1, 2, 0, 1, 2]), 6)
    uniforms = torch.rand(6, maps.length, generator=torch.Generator().manual_seed(4))
    cached = model.sample(starts, uniforms, temperature=0.8, top_k=10, cache=True)
    assert torch.equal(cached, model.sample(starts, uniforms, temperature=0.8, top_k=10, cache=False))
    assert torch.equal(cached, model.sample(starts, uniforms, temperature=0.8, top_k=10, cache=True))
    assert len(cached.unique()) > 3


def test_top_k_one_is_the_likeliest_code(iid_prior: tuple[CodePrior, CodeMaps, torch.Tensor]) -> None:
    model, maps, _ = iid_prior
    codes = model.sample(start_tokens(maps, None, 50), torch.rand(50, maps.length), top_k=1)
    assert (codes == 0).all()


def test_conditional_start_tokens_follow_the_codes() -> None:
    maps = CodeMaps(height=1, width=2, num_codes=8, num_classes=3)
    rows = training_rows(maps, torch.tensor([[[1, 2]], [[3, 4]]]), torch.tensor([2, 0]))
    assert rows.tolist() == [[10, 1, 2], [8, 3, 4]]
    assert training_rows(CodeMaps(height=1, width=1, num_codes=8), torch.tensor([[[5]]]), None).tolist() == [[8, 5]]

