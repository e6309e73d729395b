"""MONAI state dicts -> run directories and (module, variables), through the public API and `medseg import monai`."""

import json

import jax
import numpy as np
import pytest

from medseg_jax.transfer import load_monai
from tests.conftest import write_tiny_dataset
from tests.test_cli import assert_clean_error, medseg

torch = pytest.importorskip("torch", reason="torch is a test extra (make test installs it)")
monai_nets = pytest.importorskip("monai.networks.nets", reason="MONAI is a test extra (make test installs it)")

UNETR_KWARGS = dict(in_channels=1, out_channels=3, img_size=(16, 16, 16), feature_size=4, hidden_size=24, mlp_dim=48,
                    num_heads=2)


def save_unetr(path, seed=0):
    torch.manual_seed(seed)
    net = monai_nets.UNETR(**UNETR_KWARGS).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.2)
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, path)
    return net


def test_load_monai_gives_the_torch_logits(tmp_path):
    net = save_unetr(tmp_path / "unetr.pt")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = np.moveaxis(net(x).numpy(), 1, -1)
    module, variables = load_monai("unetr", tmp_path / "unetr.pt", **UNETR_KWARGS)
    ours = np.asarray(module.apply(variables, np.moveaxis(x.numpy(), 1, -1)))
    assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 1e-4


def test_encoder_only_keeps_the_decoder_initialised(tmp_path):
    save_unetr(tmp_path / "unetr.pt")
    full = load_monai("unetr", tmp_path / "unetr.pt", **UNETR_KWARGS)[1]["params"]
    module, variables = load_monai("unetr", tmp_path / "unetr.pt", encoder_only=True, **UNETR_KWARGS)
    encoder = variables["params"]["vit"]
    for a, b in zip(jax.tree.leaves(encoder), jax.tree.leaves(full["vit"])):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(variables["params"]["out"]["kernel"], full["out"]["kernel"])


def test_cli_import_monai_then_predict(tmp_path):
    save_unetr(tmp_path / "unetr.pt")
    data = write_tiny_dataset(tmp_path / "data", num_train=0, num_test=1)
    plans = tmp_path / "plans.json"  # what `medseg prepare` would write for a 3-class CT dataset
    plans.write_text(json.dumps({"target_spacing": [2.0, 2.0, 3.0], "labels": {"0": "bg", "1": "a", "2": "b"},
                                 "channel_names": {"0": "CT"}, "modality": "ct", "crop": "nonzero",
                                 "normalization": [{"scheme": "zscore"}], "label_resampling": "nearest"}))
    model_args = ["--config.model.feature_size=4", "--config.model.hidden_size=24", "--config.model.mlp_dim=48",
                  "--config.model.num_heads=2", "--config.train.patch_size=(16,16,16)"]
    run = tmp_path / "run"
    result = medseg("import", "monai", "--arch", "unetr", tmp_path / "unetr.pt", "--out", run, "--plans", plans,
                    *model_args)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "source.json").read_text())["kind"] == "monai"
    predicted = medseg("predict", "--run", run, "--input", data / "imagesTs", "--output", tmp_path / "out")
    assert predicted.returncode == 0, predicted.stderr
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1

    wrong = medseg("import", "monai", "--arch", "unetr", tmp_path / "unetr.pt", "--out", tmp_path / "run2",
                   "--plans", plans, *model_args[1:])  # feature_size 16 (default) does not match the file
    assert_clean_error(wrong, "unetr.pt", "shape")
    assert not (tmp_path / "run2").exists()
    no_plans = medseg("import", "monai", "--arch", "unetr", tmp_path / "unetr.pt", "--out", tmp_path / "run3",
                      *model_args)
    assert_clean_error(no_plans, "--plans")
