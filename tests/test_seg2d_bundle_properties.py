"""``bundles/seg2d_transfer`` against MONAI's bundle conventions (issue 15, item 2) and the thesis'
downstream recipe in ``train.yaml`` (issue 17, item 4): MONAI's property checks for train and
inference, ``dataset_dir`` with the older names as aliases, handler lists of dicts, a
``network_def`` in the inference config, JSON twins equal to the YAML; the thesis loss against
eq. 2.10 written out, the per-step polynomial decay, the rotation range.

Tiny generated data (32x32 images), a narrow ``unet2d``, CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import RandRotated
from PIL import Image

from medxfer.data.synth.shapes2d import generate_seg2d
from medxfer.workflows.bundle import bundle_dir, run_bundle
from medxfer.workflows.seg2d_transfer import Seg2DRun, sigmoid_with_background, thesis_dice_loss

BUNDLE = bundle_dir("seg2d_transfer")
CONFIGS = BUNDLE / "configs"
OURS = ("train", "evaluate", "inference", "online_selection", "select_checkpoint")
KW = {"channels": [4, 8, 16, 32, 64]}
FAST = {"arch": "unet2d", "arch_kwargs": KW, "image_size": 32, "device": "cpu", "num_workers": 0, "n_folds": 3,
        "transfer_mode": "scratch", "batch_size": 4}
REGENERATE = ("python -c \"from pathlib import Path; from monai.bundle import ConfigParser as P; "
              "[P.export_config_file(P.load_config_file(f), f.with_suffix('.json'), indent=2) "
              "for f in Path('configs').glob('*.yaml') if f.stem in " + repr(OURS) + "]\" (in bundles/seg2d_transfer)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_seg2d(tmp_path_factory.mktemp("seg2d_props") / "binary", num_images=9, size=(36, 40),
                          num_classes=1, seed=6)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg2d_props_run") / "run"
    run_bundle("seg2d_transfer", ["train"], dataset_dir=str(data), output_dir=str(out), max_epochs=1, **FAST)
    return out


def _workflow(config: str, workflow_type: str, suffix: str = ".yaml", **override) -> ConfigWorkflow:
    return ConfigWorkflow(config_file=str(CONFIGS / f"{config}{suffix}"), meta_file=str(CONFIGS / "metadata.json"),
                          workflow_type=workflow_type, bundle_root=str(BUNDLE), **override)


def test_json_configs_equal_the_yaml_configs():
    for name in OURS:
        yaml_file, twin = CONFIGS / f"{name}.yaml", CONFIGS / f"{name}.json"
        assert twin.is_file(), REGENERATE
        assert json.loads(twin.read_text()) == ConfigParser.load_config_file(yaml_file), f"{twin}: out of date; {REGENERATE}"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_train_config_passes_monai_train_property_check(data, tmp_path, suffix):
    wf = _workflow("train", "train", suffix, dataset_dir=str(data), output_dir=str(tmp_path / "run"), max_epochs=1,
                   **FAST)
    wf.initialize()
    assert wf.check_properties() == []
    assert wf.dataset_dir == str(data) and wf.parser.get_parsed_content("data_root") == str(data)
    assert [type(h).__name__ for h in wf.train_handlers] == [
        "StopOnNonFiniteLoss", "LrScheduleHandler", "ValidationHandler", "StatsHandler", "FallbackModelSaver"]
    assert [type(h).__name__ for h in wf.val_handlers] == ["StatsHandler", "AtomicCheckpointSaver", "MetricHistory"]
    config = ConfigParser.load_config_file(CONFIGS / f"train{suffix}")
    for key in ("handlers",):
        assert all(isinstance(h, dict) and isinstance(h.get("_target_"), str) for h in config["train"][key])
        assert all(isinstance(h, dict) and isinstance(h.get("_target_"), str) for h in config["validate"][key])


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_inference_config_passes_monai_inference_property_check(data, trained, tmp_path, suffix):
    wf = _workflow("inference", "inference", suffix, dataset_dir=str(data / "images"), run_dir=str(trained),
                   output_dir=str(tmp_path / "pred"), device="cpu")
    wf.initialize()
    assert wf.check_properties() == []
    # network_def comes from the config (run.json filled the unset arch / kwargs / size / classes)
    net = wf.parser.get_parsed_content("network_def")
    assert type(net).__name__ == type(Seg2DRun(trained, "cpu").network).__name__
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_inference_through_the_evaluator_equals_medxfer_predictions(data, trained, tmp_path):
    """``--dataset_dir`` and ``--input_dir`` (the older name) give the masks :class:`Seg2DRun` predicts."""
    for key in ("dataset_dir", "input_dir"):
        out = tmp_path / key
        run_bundle("seg2d_transfer", ["inference"], **{key: str(data / "images")}, run_dir=str(trained),
                   output_dir=str(out), device="cpu")
        run = Seg2DRun(trained, "cpu")
        for image in sorted((data / "images").iterdir()):
            got = np.asarray(Image.open(out / f"{image.stem}.png"))
            assert np.array_equal(got, run.predict(image) * 255), (key, image.name)


def test_inference_weights_from_models_folder_and_a_contradicting_arch_is_refused(data, trained, tmp_path):
    """Without a run folder the network is the config's alone (the bundle's models/model.pt layout)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes((trained / "model.pt").read_bytes())
    out = tmp_path / "pred"
    run_bundle("seg2d_transfer", ["inference"], dataset_dir=str(data / "images"), model_dir=str(models),
               output_dir=str(out), device="cpu", arch="unet2d", arch_kwargs=KW, image_size=32)
    image = sorted((data / "images").iterdir())[0]
    assert np.array_equal(np.asarray(Image.open(out / f"{image.stem}.png")), Seg2DRun(trained, "cpu").predict(image) * 255)
    with pytest.raises(ValueError, match="trained with arch 'unet2d', not 'swin_unet'"):
        run_bundle("seg2d_transfer", ["inference"], dataset_dir=str(data / "images"), run_dir=str(trained),
                   output_dir=str(tmp_path / "x"), device="cpu", arch="swin_unet")


def _dice_sq(y, p, eps=1e-5):   # eq. 1.10 over the flattened batch
    return 1 - (2 * (y * p).sum() + eps) / ((y ** 2).sum() + (p ** 2).sum() + eps)


def test_thesis_loss_is_eq_2_10_with_the_background():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8)
    label = (torch.rand(3, 1, 8, 8) > 0.6).float()
    p1 = torch.sigmoid(logits)
    expected = (_dice_sq(1 - label, 1 - p1) + _dice_sq(label, p1)) / 2   # binary: y^_0 = 1 - y^_1
    assert float(thesis_dice_loss(True)(logits, label)) == pytest.approx(float(expected), rel=1e-6)
    assert torch.allclose(sigmoid_with_background(logits).sum(1), torch.ones(3, 8, 8))
    logits = torch.randn(2, 3, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8)).float()
    prob = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(label[:, 0].long(), 3).permute(0, 3, 1, 2).float()
    expected = sum(_dice_sq(onehot[:, c], prob[:, c]) for c in range(3)) / 3
    assert float(thesis_dice_loss(False)(logits, label)) == pytest.approx(float(expected), rel=1e-6)


def test_recipe_defaults_and_the_medxfer_v1_preset(data, tmp_path):
    for recipe, epochs, batch, lr in (("thesis", 150, 24, 0.05), ("medxfer_v1", 100, 8, 0.01)):
        wf = _workflow("train", "train", dataset_dir=str(data), output_dir=str(tmp_path / recipe), recipe=recipe,
                       device="cpu", num_workers=0, arch="unet2d", arch_kwargs=KW, image_size=32, n_folds=3,
                       transfer_mode="scratch")
        wf.initialize()
        parser = wf.parser
        assert (parser.get_parsed_content("max_epochs"), parser.get_parsed_content("batch_size"),
                parser.get_parsed_content("learning_rate")) == (epochs, batch, lr)
        steps = len(parser.get_parsed_content("train#dataloader"))
        scheduler = parser.get_parsed_content("lr_scheduler")
        handler = parser.get_parsed_content("train#handlers")[1]
        assert handler.epoch_level is (recipe != "thesis")
        assert scheduler.total_iters == (epochs * steps if recipe == "thesis" else epochs)
        rotations = [t for t in parser.get_parsed_content("train#dataset").transform.transforms
                     if isinstance(t, RandRotated)]
        if recipe == "thesis":
            (rot,) = rotations
            assert rot.rand_rotate.range_x == (0.0, math.pi) and rot.rand_rotate.prob == 1.0
        else:
            assert not rotations


def test_thesis_lr_decays_after_every_step(data, trained):
    """eq. 2.3 per optimizer step: after k of N steps the learning rate is ``lr0 (1 - k / N)^0.9``."""
    wf = _workflow("train", "train", dataset_dir=str(data), output_dir=str(trained.parent / "lr"), max_epochs=3,
                   **FAST)
    wf.initialize()
    scheduler, optimizer = wf.parser.get_parsed_content("lr_scheduler"), wf.parser.get_parsed_content("optimizer")
    n = scheduler.total_iters
    assert n == 3 * len(wf.parser.get_parsed_content("train#dataloader"))
    for k in range(1, n + 1):
        optimizer.step()   # no gradients: weights unchanged, the schedule advances as in training
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * (1 - k / n) ** 0.9, abs=1e-12)
