"""Models by name, import path and checkpoint; artifacts saved and loaded as data only."""

import pickle

import pytest
import torch

from compress.models.artifact import ArtifactError, load, save
from compress.models.build import ModelError, build_model
from compress.spec.recipe import ModelConfig, RecipeError


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "regnet_x_400mf"])
def test_torchvision_models_adapt_to_the_data(name):
    model = build_model(ModelConfig(name=name), num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_unknown_model_suggests():
    with pytest.raises(RecipeError, match="did you mean 'resnet18'"):
        build_model(ModelConfig(name="resnet1"), num_classes=10)


def test_import_path_gets_data_shape():
    model = build_model(ModelConfig(name="tests.tiny:tiny_cnn"), num_classes=3, in_channels=2)
    assert model(torch.randn(1, 2, 28, 28)).shape == (1, 3)
    with pytest.raises(RecipeError, match="cannot import"):
        build_model(ModelConfig(name="tests.tiny:nope"), num_classes=3)


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = build_model(ModelConfig(name="tests.tiny:tiny_cnn"), num_classes=10, in_channels=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    again = build_model(
        ModelConfig(name="tests.tiny:tiny_cnn", checkpoint=str(tmp_path / "w.pt")), 10, 1
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
    with pytest.raises(ModelError, match="does not fit"):
        build_model(
            ModelConfig(name="tests.tiny:tiny_cnn", checkpoint=str(tmp_path / "w.pt")), 5, 1
        )


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"weight": _Evil()}, path)  # a real torch.save zip, with code in its pickle
    with pytest.raises(ModelError, match="never unpickles code"):
        build_model(ModelConfig(name="tests.tiny:tiny_cnn", checkpoint=str(path)), 10, 1)
    with open(path, "wb") as f:  # a bare pickle, the format before torch.save's zip
        pickle.dump({"weight": _Evil()}, f)
    with pytest.raises(ModelError, match="refused"):
        build_model(ModelConfig(name="tests.tiny:tiny_cnn", checkpoint=str(path)), 10, 1)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_save_load_identical_and_never_overwrites(tmp_path):
    model = build_model(
        ModelConfig(name="tests.tiny:tiny_cnn"), num_classes=10, in_channels=1
    ).eval()
    folder = save(model, tmp_path / "m")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), load(folder, trusted_imports={"tests.tiny:tiny_cnn"})(x))
    with pytest.raises(ArtifactError, match="already exists"):
        save(model, folder)
    assert not list(tmp_path.glob(".m.tmp-*"))  # no staging folder left behind


def test_model_without_spec_is_exported(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    x = torch.randn(5, 3, 2, 2)
    folder = save(model, tmp_path / "m", example=x)
    with torch.no_grad():
        assert torch.equal(model(x), load(folder)(x))


def test_load_refuses_a_folder_that_is_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a compress model folder"):
        load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"kind": "state_dict", "file": "../../etc/passwd"}')
    with pytest.raises(ArtifactError, match="not in the folder"):
        load(tmp_path)
