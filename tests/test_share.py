"""Weight sharing: k-means codebooks, centroid fine-tuning, prune -> share, the artifact."""

import pytest
import torch

from compress.models.artifact import load, save
from compress.stages.prune import prune
from compress.stages.share import kmeans_1d, share

BITS = {"conv": 3, "linear": 4}


def _unique(model, name):
    return torch.unique(model.get_submodule(name).weight.detach()).numel()


def test_kmeans_finds_clusters_and_is_seeded():
    values = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.5), torch.full((20,), 2.0)])
    values = values + 0.01 * torch.randn(100, generator=torch.Generator().manual_seed(0))
    centroids, index = kmeans_1d(values, 3)
    assert torch.allclose(centroids, torch.tensor([-1.0, 0.5, 2.0]), atol=0.01)
    assert index.tolist() == [0] * 50 + [1] * 30 + [2] * 20
    weights = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    for init in ("linear", "density", "random"):
        a, b = kmeans_1d(weights, 16, init, seed=3), kmeans_1d(weights, 16, init, seed=3)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.unique(a[0][a[1]]).numel() <= 16


def test_layers_get_at_most_2_to_the_bits_values(tiny, fmnist):
    shared = share(tiny, fmnist, bits=BITS, fine_tune={"epochs": 0})
    for row in shared.stage_details["layers"]:
        limit = 2 ** BITS["conv" if row["type"].startswith("Conv") else "linear"]
        assert row["unique_values"] == _unique(shared, row["layer"]) <= limit
    assert [r["layer"] for r in shared.stage_details["layers"]] == ["0", "4", "8", "13"]
    assert _unique(tiny, "4") > 1000  # the input model is left as it was


def test_fine_tune_trains_centroids_and_keeps_weights_on_the_codebook(tiny, fmnist):
    before = share(tiny, fmnist, bits=BITS, fine_tune={"epochs": 0})
    tuned = share(
        tiny,
        fmnist,
        bits=BITS,
        fine_tune={"epochs": 0, "max_steps": 15, "optimizer": "adamw", "lr": 1e-3},
    )
    for name in ("0", "4", "8", "13"):
        old = torch.unique(before.get_submodule(name).weight.detach())
        new = torch.unique(tuned.get_submodule(name).weight.detach())
        assert new.numel() <= old.numel()  # still one codebook per layer
        assert not torch.allclose(old, new[: old.numel()])  # the centroids moved
    # Every weight that shared a value before still shares one with the same weights.
    old_w, new_w = before.get_submodule("4").weight, tuned.get_submodule("4").weight
    _, old_index = torch.unique(old_w, return_inverse=True)
    _, new_index = torch.unique(new_w, return_inverse=True)
    for cluster in range(int(old_index.max()) + 1):
        assert new_index[old_index == cluster].unique().numel() == 1


def test_prune_then_share_keeps_zeros_and_shares_the_rest(tiny, fmnist, tmp_path):
    sparse = prune(tiny, fmnist, method="magnitude", sparsity=0.8, scope="global")
    shared = share(
        sparse, fmnist, bits=BITS, fine_tune={"epochs": 0, "max_steps": 5, "optimizer": "adamw"}
    )
    for name in ("4", "8"):
        was_zero = sparse.get_submodule(name).weight == 0
        weight = shared.get_submodule(name).weight
        assert torch.equal(weight == 0, was_zero)  # pruned stay pruned, survivors stay non-zero
        assert torch.unique(weight).numel() <= 2 ** BITS["conv"]
    # Stored as mask + indices of the survivors, restored exactly, smaller than sparse alone.
    again = load(save(shared, tmp_path / "shared"), trust_code=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in shared.state_dict().items())
    sparse_size = sum(f.stat().st_size for f in save(sparse, tmp_path / "sparse").rglob("*"))
    shared_size = sum(f.stat().st_size for f in (tmp_path / "shared").rglob("*"))
    assert shared_size < sparse_size / 2


def test_artifact_stores_codebooks_and_round_trips_exactly(tiny, fmnist, tmp_path):
    shared = share(tiny, fmnist, bits=BITS, fine_tune={"epochs": 0})
    dense = save(tiny, tmp_path / "dense")
    folder = save(shared, tmp_path / "shared")
    again = load(folder, trust_code=True)
    for key, value in shared.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    size = sum(f.stat().st_size for f in folder.rglob("*"))
    dense_size = sum(f.stat().st_size for f in dense.rglob("*"))
    assert size < dense_size / 4  # 3-4 bit indices instead of 32-bit floats


@pytest.mark.parametrize("bits", [{"conv": 9}, {"conv": 0}])
def test_bits_are_validated(bits):
    from compress.core.errors import RecipeError
    from compress.spec.recipe import parse_recipe

    with pytest.raises(RecipeError, match=r"stages\[0\]\.share\.bits\.conv: .* out of range"):
        parse_recipe({"stages": [{"share": {"bits": bits}}]})
