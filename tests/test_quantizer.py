from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dvae_cli.models.vqvae.quantizer import VectorQuantizer


def as_grid(vectors: list[list[float]]) -> torch.Tensor:
    """Vectors [M, D] -> encoder-output layout [1, D, 1, M]."""
    return torch.tensor(vectors).t().reshape(1, -1, 1, len(vectors))


def gaussian_blobs(centers: torch.Tensor, per_blob: int, spread: float) -> torch.Tensor:
    """Points around each of centers [B, D] as an encoder output [B, D, 1, per_blob]."""
    points = centers.unsqueeze(1) + spread * torch.randn(*centers.shape[:1], per_blob, centers.shape[1])
    return points.movedim(2, 1).unsqueeze(2)


def set_ema_state(quantizer: VectorQuantizer, codebook: list[list[float]], sizes: list[float]) -> None:
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor(codebook))
        quantizer.cluster_size.copy_(torch.tensor(sizes))
        if quantizer.update == "ema":
            quantizer.embed_sum.copy_(quantizer.codebook * quantizer.cluster_size.unsqueeze(1))


def quantization_error(quantizer: VectorQuantizer, z_e: torch.Tensor) -> float:
    return (quantizer.lookup(quantizer.codes(z_e)) - z_e).pow(2).mean().item()


def test_indices_are_brute_force_nearest_neighbours() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(32, 8, init="random").eval()
    with torch.no_grad():
        quantizer.codebook.normal_()
    z_e = torch.randn(3, 8, 5, 4)
    output = quantizer(z_e)

    vectors = z_e.permute(0, 2, 3, 1).reshape(-1, 8)
    distances = torch.cdist(vectors, quantizer.codebook, compute_mode="donot_use_mm_for_euclid_dist")
    expected = distances.argmin(1).reshape(3, 5, 4)
    assert output.indices.dtype == torch.int64
    assert torch.equal(output.indices, expected)
    assert torch.equal(quantizer.codes(z_e), expected)
    assert output.usage.dtype == torch.int64
    assert torch.equal(output.usage, torch.bincount(expected.flatten(), minlength=32))


def test_straight_through_gradient_is_identity() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 4, init="random")
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    (quantizer(z_e).quantized * upstream).sum().backward()
    assert z_e.grad is not None
    assert torch.equal(z_e.grad, upstream)


def test_one_ema_step_matches_hand_computation() -> None:
    quantizer = VectorQuantizer(
        2, 2, update="ema", ema_decay=0.5, init="random", dead_code_threshold=0.0, epsilon=0.5
    )
    set_ema_state(quantizer, [[0.0, 0.0], [10.0, 10.0]], [1.0, 1.0])
    output = quantizer(as_grid([[1.0, 1.0], [-1.0, 1.0], [9.0, 11.0]]))

    # Assignment 0, 0, 1: counts n = (2, 1), sums (0, 2) and (9, 11).
    assert output.indices.flatten().tolist() == [0, 0, 1]
    # The returned z_q uses the codebook from before the update.
    assert torch.equal(output.quantized, as_grid([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]))
    # N = 0.5 (1, 1) + 0.5 (2, 1) = (1.5, 1);  m0 = 0.5 (0, 0) + 0.5 (0, 2) = (0, 1);
    # m1 = 0.5 (10, 10) + 0.5 (9, 11) = (9.5, 10.5).
    assert torch.allclose(quantizer.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(quantizer.embed_sum, torch.tensor([[0.0, 1.0], [9.5, 10.5]]))
    # n = 2.5; smoothed N = (N + 0.5) / (2.5 + 2 * 0.5) * 2.5 = (10/7, 15/14).
    # e0 = (0, 1) * 7/10 = (0, 0.7);  e1 = (9.5, 10.5) * 14/15 = (133/15, 9.8).
    expected_codebook = torch.tensor([[0.0, 0.7], [133.0 / 15.0, 9.8]])
    assert torch.allclose(quantizer.codebook, expected_codebook)


def test_commitment_and_codebook_losses_by_hand() -> None:
    z_e = as_grid([[1.0, 2.0], [-1.0, 1.0], [9.0, 11.0]])
    # Nearest codes (0, 0), (0, 0), (10, 10): squared errors 5 + 2 + 2 = 9 over 6 elements = 1.5.
    for update in ("ema", "loss"):
        quantizer = VectorQuantizer(2, 2, update=update, init="random").eval()
        set_ema_state(quantizer, [[0.0, 0.0], [10.0, 10.0]], [1.0, 1.0])
        output = quantizer(z_e)
        assert output.commitment_loss.item() == pytest.approx(0.25 * 1.5)
        if update == "loss":
            assert output.codebook_loss.item() == pytest.approx(1.5)
        else:
            assert output.codebook_loss.item() == 0.0


def test_codebook_storage_per_update_mode() -> None:
    ema = VectorQuantizer(4, 3, update="ema")
    assert list(dict(ema.named_parameters())) == []
    assert {"codebook", "cluster_size", "embed_sum", "initialized", "restart_count"} <= set(
        ema.state_dict()
    )
    loss = VectorQuantizer(4, 3, update="loss")
    assert list(dict(loss.named_parameters())) == ["codebook"]
    assert {"codebook", "cluster_size", "initialized", "restart_count"} <= set(loss.state_dict())


def test_random_init_keeps_ema_state_consistent() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, init="random")
    assert bool(quantizer.initialized)
    assert quantizer.codebook.abs().max() <= 1.0 / 16
    assert torch.equal(quantizer.embed_sum, quantizer.codebook * quantizer.cluster_size.unsqueeze(1))


def test_loss_mode_learns_codebook_by_gradient_and_restarts() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, update="loss", init="random")
    z_e = torch.randn(4, 4, 3, 3) + 3.0
    output = quantizer(z_e)
    (output.commitment_loss + output.codebook_loss).backward()
    assert output.codebook_loss.item() > 0.0
    assert quantizer.codebook.grad is not None and quantizer.codebook.grad.abs().sum() > 0
    assert quantizer.restart_count.item() > 0


def test_dead_codes_are_restarted_and_then_used() -> None:
    torch.manual_seed(0)
    num_codes = 16
    quantizer = VectorQuantizer(num_codes, 4, init="random", dead_code_threshold=1.0)
    # The codebook sits near the origin, the data far from it on one side: nearly every code is dead
    # at the start.
    centers = 30.0 + 5.0 * torch.randn(num_codes, 4)
    batches = [gaussian_blobs(centers, 32, spread=0.5) for _ in range(6)]

    first = quantizer(batches[0])
    unused_at_start = first.usage == 0
    assert int(unused_at_start.sum()) >= num_codes - 2
    assert quantizer.restart_count.item() >= int(unused_at_start.sum())

    later_usage = sum(quantizer(batch).usage for batch in batches[1:])
    assert bool((later_usage[unused_at_start] > 0).all())


def test_kmeans_init_beats_random_init_on_clustered_data() -> None:
    torch.manual_seed(0)
    z_e = gaussian_blobs(10.0 * torch.randn(16, 8), 64, spread=0.3)
    errors = {}
    for init in ("kmeans", "random"):
        quantizer = VectorQuantizer(16, 8, init=init, dead_code_threshold=0.0)
        quantizer(z_e)
        errors[init] = quantization_error(quantizer.eval(), z_e)
    # A centroid on every blob leaves only the within-blob variance 0.3² = 0.09 per element.
    assert errors["kmeans"] < 0.12
    assert errors["kmeans"] < errors["random"] / 100


def test_kmeans_init_with_fewer_vectors_than_codes() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(32, 2, init="kmeans", dead_code_threshold=0.0)
    z_e = torch.randn(1, 2, 2, 5)
    quantizer(z_e)
    vectors = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    # Every code is one of the 10 vectors (sampled with replacement) and each vector has its own code.
    distances = torch.cdist(quantizer.codebook, vectors, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.min(1).values.max() < 1e-5
    assert quantization_error(quantizer.eval(), z_e) < 1e-10


def test_resumed_model_is_not_reinitialised() -> None:
    torch.manual_seed(0)
    original = VectorQuantizer(8, 4, init="kmeans")
    assert not bool(original.initialized)
    original(torch.randn(2, 4, 4, 4))
    assert bool(original.initialized)
    resumed = VectorQuantizer(8, 4, init="kmeans")
    resumed.load_state_dict(original.state_dict())

    batch = torch.randn(2, 4, 4, 4) + 1.0
    torch.manual_seed(1)
    original(batch)
    torch.manual_seed(1)
    resumed(batch)
    for name, value in original.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_codes_has_no_side_effects() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 4, init="kmeans")
    z_e = torch.randn(2, 4, 3, 3)
    before = {name: value.clone() for name, value in quantizer.state_dict().items()}
    rng_before = torch.get_rng_state()
    quantizer.codes(z_e)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name, value in quantizer.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_lookup_of_codes_equals_quantized_in_eval_mode() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, init="kmeans")
    quantizer(torch.randn(4, 4, 6, 6))
    quantizer.eval()
    z_e = torch.randn(3, 4, 6, 6)
    output = quantizer(z_e)
    assert torch.equal(quantizer.lookup(quantizer.codes(z_e)), output.quantized)
    assert torch.equal(quantizer.lookup(output.indices), output.quantized)


def test_autocast_keeps_distances_in_float32() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(256, 16, init="random").eval()
    with torch.no_grad():
        quantizer.codebook.normal_(mean=5.0)
    z_e = (torch.randn(4, 16, 8, 8) + 5.0).bfloat16()
    vectors = z_e.float().permute(0, 2, 3, 1).reshape(-1, 16)
    exact = torch.cdist(vectors, quantizer.codebook).argmin(1).reshape(4, 8, 8)
    # Guard: the data is one where bf16 distances would pick different codes.
    bf16_scores = quantizer.codebook.bfloat16().pow(2).sum(1) - 2 * (
        vectors.bfloat16() @ quantizer.codebook.bfloat16().t()
    )
    assert not torch.equal(bf16_scores.argmin(1).reshape(4, 8, 8), exact)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_output = quantizer(z_e)
        fp32_output = quantizer(z_e.float())
        codes = quantizer.codes(z_e)
    assert torch.equal(bf16_output.indices, exact)
    assert torch.equal(fp32_output.indices, exact)
    assert torch.equal(codes, exact)
    assert bf16_output.quantized.dtype == torch.bfloat16
    assert fp32_output.quantized.dtype == torch.float32
    assert bf16_output.commitment_loss.dtype == torch.float32


def test_autocast_training_step_keeps_float32_statistics() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 4, init="kmeans")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantizer(torch.randn(2, 4, 4, 4).bfloat16())
    for name in ("codebook", "cluster_size", "embed_sum"):
        assert getattr(quantizer, name).dtype == torch.float32


def test_perplexity_of_uniform_usage_is_num_codes() -> None:
    quantizer = VectorQuantizer(4, 2, init="random").eval()
    set_ema_state(quantizer, [[0.0, 0.0], [0.0, 10.0], [10.0, 0.0], [10.0, 10.0]], [1.0] * 4)
    z_e = as_grid([[0.0, 0.0], [0.0, 10.0], [10.0, 0.0], [10.0, 10.0]] * 3)
    output = quantizer(z_e)
    assert output.usage.tolist() == [3, 3, 3, 3]
    assert output.perplexity.item() == pytest.approx(4.0)
    assert quantizer(as_grid([[0.0, 0.0]] * 5)).perplexity.item() == pytest.approx(1.0)


def test_same_seed_gives_identical_codebooks() -> None:
    def train() -> torch.Tensor:
        torch.manual_seed(123)
        quantizer = VectorQuantizer(16, 4, init="kmeans", dead_code_threshold=2.0)
        for _ in range(4):
            quantizer(torch.randn(4, 4, 4, 4) * 3.0)
        assert quantizer.restart_count.item() > 0
        return quantizer.codebook.clone()

    assert torch.equal(train(), train())


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="update"):
        VectorQuantizer(4, 2, update="adam")
    with pytest.raises(ValueError, match="init"):
        VectorQuantizer(4, 2, init="zeros")
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(4, 2, ema_decay=1.0)
    with pytest.raises(ValueError, match=r"\[N, 2"):
        VectorQuantizer(4, 2)(torch.zeros(1, 3, 2, 2))


def _distributed_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        # Identical construction, then different data and RNG streams per rank.
        torch.manual_seed(0)
        plain = VectorQuantizer(8, 3, init="random", dead_code_threshold=0.0)
        restarting = VectorQuantizer(8, 3, init="kmeans", dead_code_threshold=12.0)
        torch.manual_seed(100 + rank)
        batch = torch.load(Path(out_dir) / f"batch{rank}.pt")
        plain(batch)
        for step in range(3):
            restarting(batch + step)
        torch.save(
            {"plain": plain.state_dict(), "restarting": restarting.state_dict()},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_share_one_codebook(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # Equal local batches, as the trainer makes them (the global batch split evenly over ranks).
    batches = [torch.randn(3, 3, 4, 4) * 2.0, torch.randn(3, 3, 4, 4) * 2.0 + 1.0]
    for rank, batch in enumerate(batches):
        torch.save(batch, tmp_path / f"batch{rank}.pt")
    mp.spawn(
        _distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True
    )
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for kind in ("plain", "restarting"):
        for name, value in states[0][kind].items():
            assert torch.equal(value, states[1][kind][name]), (kind, name)
    assert states[0]["restarting"]["restart_count"].item() > 0

    # Summed statistics: two ranks with batches A and B update like one process with A and B.
    torch.manual_seed(0)
    single = VectorQuantizer(8, 3, init="random", dead_code_threshold=0.0)
    single(torch.cat(batches))
    for name, value in single.state_dict().items():
        assert torch.allclose(value, states[0]["plain"][name], atol=1e-6), name
