"""A real nnU-Net v2 trained-model folder made by nnU-Net itself, its checkpoints read without running
pickled code, and nnU-Net's preprocessing as a MONAI transform, checked against the cases nnU-Net
preprocessed for its own training (read back with nnU-Net's own dataset class) and, for a case nnU-Net
does not resample, against a closed-form computation on the file read by nibabel."""

import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medxfer.data.msd import load_task
from medxfer.data.problems import DatasetError
from medxfer.data.synth.msd import generate_msd_task
from medxfer.planning.nnunet_model import (NNUNET_CHECKPOINT_GLOBALS, TINY_TASK, TRAINER_FOLDER_FILES,
                                           NnUNetCheckpointError, load_nnunet_checkpoint, read_nnunet_checkpoint,
                                           train_nnunet_model)
from medxfer.transforms.nnunet_preprocessing import NnUNetPreprocessd, nnunet_preprocessing_summary

CONFIG = "3d_fullres"


@pytest.mark.slow
def test_folder_holds_what_nnunet_writes(nnunet_model):
    folder = nnunet_model["folder"]
    assert folder.name == f"nnUNetTrainer__nnUNetPlans__{CONFIG}" and folder.parent.name == "Dataset990_Spleen"
    for name in TRAINER_FOLDER_FILES:
        assert (folder / name).is_file(), name
    fold = folder / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "checkpoint_best.pth").is_file()
    assert not (fold / "checkpoint_latest.pth").exists()  # nnU-Net removes it at the end of training
    assert list(fold.glob("training_log_*.txt"))
    summary = json.loads((fold / "validation" / "summary.json").read_text())  # nnU-Net's final validation
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    # the trainer copies nnU-Net's own plans and fingerprint from nnUNet_preprocessed
    pre = nnunet_model["preprocessed"].parent
    assert nnunet_model["plans"] == json.loads((pre / "nnUNetPlans.json").read_text())
    assert json.loads((folder / "dataset_fingerprint.json").read_text()) == json.loads((pre / "dataset_fingerprint.json").read_text())
    assert nnunet_model["plans"]["configurations"][CONFIG]["architecture"]["network_class_name"].endswith("PlainConvUNet")
    run = json.loads((nnunet_model["out_dir"] / "medxfer_nnunet_run.json").read_text())
    assert set(run["seconds"]) == {"convert", "plan_and_preprocess", "train"}
    print(f"nnU-Net model made in {nnunet_model['seconds']:.1f} s: {run['seconds']}")


@pytest.mark.slow
def test_checkpoint_is_nnunets_and_loads_into_nnunets_network(nnunet_model):
    folder, plans, dataset_json = nnunet_model["folder"], nnunet_model["plans"], nnunet_model["dataset_json"]
    ckpt = load_nnunet_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    assert {"network_weights", "optimizer_state", "init_args", "trainer_name", "inference_allowed_mirroring_axes",
            "current_epoch", "logging", "_best_ema"} <= set(ckpt)
    assert ckpt["trainer_name"] == "nnUNetTrainer"
    assert ckpt["current_epoch"] == 1  # one epoch trained
    init = ckpt["init_args"]
    assert init["configuration"] == CONFIG and init["fold"] == 0
    assert init["plans"] == plans and init["dataset_json"] == dataset_json
    assert isinstance(ckpt["_best_ema"], np.float32)  # the NumPy scalars weights_only refuses by default
    # the network exactly as nnU-Net builds it from the plans takes the weights, every key
    manager = PlansManager(plans)
    conf = manager.get_configuration(CONFIG)
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    network = get_network_from_plans(conf.network_arch_class_name, conf.network_arch_init_kwargs,
                                     conf.network_arch_init_kwargs_req_import, 1, heads, deep_supervision=False)
    network.load_state_dict(ckpt["network_weights"], strict=True)
    with torch.no_grad():
        out = network.eval()(torch.zeros(1, 1, *conf.patch_size))
    assert tuple(out.shape) == (1, heads, *conf.patch_size)
    info = read_nnunet_checkpoint(folder / "fold_0" / "checkpoint_best.pth")
    assert info["trainer_name"] == "nnUNetTrainer" and info["configuration"] == CONFIG and info["fold"] == 0
    assert info["plans"] == plans and info["dataset_json"] == dataset_json
    assert set(info["network_weights"]) == set(network.state_dict())
    assert info["inference_allowed_mirroring_axes"] == [0, 1, 2]


@pytest.mark.slow
def test_plain_weights_only_refuses_exactly_numpy_scalars(nnunet_model):
    path = nnunet_model["folder"] / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(path, weights_only=True)
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in NNUNET_CHECKPOINT_GLOBALS}
    assert unsafe and unsafe <= allowed, unsafe  # numpy.dtype and numpy._core.multiarray.scalar under NumPy 2
    assert all(name.startswith("numpy.") for name in unsafe)


class _Payload:
    """Unpickling calls ``os.mkdir(marker)``: the code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("extra", ["code", "array"])
def test_safe_loader_refuses_other_pickled_objects_without_running_them(tmp_path, extra):
    marker = tmp_path / "executed"
    obj = _Payload(marker) if extra == "code" else np.arange(3)  # arrays are not in nnU-Net's checkpoints
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.zeros(2)}, "trainer_name": "nnUNetTrainer", "logging": {"x": [obj]}}, path)
    with pytest.raises(NnUNetCheckpointError, match="refused") as err:
        load_nnunet_checkpoint(path)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert ("posix.mkdir" in message or "os.mkdir" in message) if extra == "code" else "numpy" in message


def test_safe_loader_reads_numpy_scalars_and_rejects_non_nnunet_files(tmp_path):
    good = tmp_path / "ok.pth"
    torch.save({"network_weights": {"w": torch.ones(2)}, "_best_ema": np.float32(0.5), "logging": {"d": [np.float64(0.25)]},
                "init_args": {"configuration": CONFIG, "fold": 1}, "trainer_name": "nnUNetTrainer"}, good)
    info = read_nnunet_checkpoint(good)
    assert info["configuration"] == CONFIG and info["fold"] == 1 and torch.equal(info["network_weights"]["w"], torch.ones(2))
    assert load_nnunet_checkpoint(good)["logging"]["d"][0] == np.float64(0.25)
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(NnUNetCheckpointError, match="no 'network_weights'"):
        load_nnunet_checkpoint(plain)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(NnUNetCheckpointError, match="not a readable PyTorch checkpoint"):
        load_nnunet_checkpoint(junk)
    with pytest.raises(NnUNetCheckpointError, match="not found"):
        load_nnunet_checkpoint(tmp_path / "missing.pth")


def _transform(model, keys=("image", "label"), **kwargs):
    return NnUNetPreprocessd(keys, model["plans"], CONFIG, model["dataset_json"], **kwargs)


@pytest.mark.slow
def test_preprocessd_equals_the_cases_nnunet_preprocessed_for_training(nnunet_model):
    """The independent check: nnU-Net's own files in nnUNet_preprocessed, read with nnU-Net's dataset class."""
    pre = str(nnunet_model["preprocessed"])
    dataset = infer_dataset_class(pre)(pre)
    transform = _transform(nnunet_model)
    task = load_task(nnunet_model["task"])  # the user's MSD files, not nnU-Net's converted copies
    assert sorted(dataset.identifiers) == sorted(r["id"] for r in task.training)
    outside = 0
    for record in task.training:
        out = transform(record)
        data, seg, _, _ = dataset.load_case(record["id"])
        data, seg = np.asarray(data[:]), np.asarray(seg[:])
        assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.int64
        assert tuple(out["image"].shape) == data.shape and tuple(out["label"].shape) == seg.shape and seg.shape[0] == 1
        np.testing.assert_allclose(out["image"].numpy(), data, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(out["label"].numpy(), np.where(seg == -1, 0, seg))
        outside += int((seg == -1).sum())
        assert out["id"] == record["id"]  # other keys pass through
    assert outside > 0  # nnU-Net's outside-the-crop-mask marker occurred, and became background


def _median_case(model):
    """The training case whose header spacing is nnU-Net's target spacing: nnU-Net does not resample it."""
    task = load_task(model["task"])
    target = nnunet_preprocessing_summary(model["plans"], CONFIG, model["dataset_json"])["spacing_file_axes"]
    for record in task.training:
        if np.allclose(nib.load(record["image"]).header.get_zooms()[:3], target, rtol=1e-5):
            return record, target
    raise AssertionError("no training case at the median spacing")


@pytest.mark.slow
def test_summary_numbers_and_axes_match_the_files(nnunet_model):
    summary = nnunet_preprocessing_summary(nnunet_model["plans"], CONFIG, nnunet_model["dataset_json"])
    record, spacing = _median_case(nnunet_model)  # header zooms (file axes i, j, k) == spacing_file_axes
    assert summary["spacing_file_axes"][2] == pytest.approx(TINY_TASK["spacing"][2])  # k: the slice axis
    assert summary["spacing_nnunet"] == pytest.approx(spacing[::-1])  # SimpleITK order, transpose identity
    assert summary["patch_size_file_axes"] == summary["patch_size_nnunet"][::-1]
    assert summary["reader"] == "SimpleITKIO" and summary["orientation"].startswith("nnU-Net: none")
    assert summary["transpose_forward"] == [0, 1, 2] and summary["preprocessor"] == "DefaultPreprocessor"
    fingerprint = json.loads((nnunet_model["folder"] / "dataset_fingerprint.json").read_text())
    props = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    (norm,) = summary["normalization"]
    assert norm["scheme"] == "CTNormalization" and norm["name"] == "CT" and norm["use_mask"] is False
    assert norm["clip"] == [props["percentile_00_5"], props["percentile_99_5"]]
    assert (norm["mean"], norm["std"]) == (props["mean"], props["std"])
    assert summary["labels"] == {"background": 0, "spleen": 1}
    json.dumps(summary)  # JSON-able as it is


@pytest.mark.slow
def test_median_case_is_the_closed_form_ct_normalisation_of_the_file(nnunet_model):
    """No resampling at the median spacing: nnU-Net's output is clip/mean/std of the summary on the
    nibabel array, axes reversed, cropped to nnU-Net's bounding box; image-only records work too."""
    record, _ = _median_case(nnunet_model)
    (norm,) = nnunet_preprocessing_summary(nnunet_model["plans"], CONFIG, nnunet_model["dataset_json"])["normalization"]
    out = _transform(nnunet_model, meta_key="nnunet")(record)
    box = tuple(slice(a, b) for a, b in out["nnunet"]["bbox_used_for_cropping"])
    raw = np.asanyarray(nib.load(record["image"]).dataobj).astype(np.float64).transpose(2, 1, 0)[box]
    expected = (np.clip(raw, *norm["clip"]) - norm["mean"]) / norm["std"]
    np.testing.assert_allclose(out["image"][0].numpy(), expected, rtol=0, atol=1e-5)
    label = np.asanyarray(nib.load(record["label"]).dataobj).transpose(2, 1, 0)[box]
    np.testing.assert_array_equal(out["label"][0].numpy(), label)
    for keys, kwargs in ((("image",), {}), (("image", "label"), {"allow_missing_keys": True})):
        image_only = _transform(nnunet_model, keys, **kwargs)({"image": [record["image"]]})
        assert set(image_only) == {"image"} and torch.equal(image_only["image"], out["image"])


@pytest.mark.slow
def test_preprocessd_errors_name_the_file(nnunet_model, tmp_path):
    record, _ = _median_case(nnunet_model)
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(DatasetError, match="nope.nii.gz: image file not found"):
        _transform(nnunet_model)({"image": str(missing), "label": record["label"]})
    with pytest.raises(DatasetError, match=r"2 channel\(s\), but the nnU-Net plans expect 1") as err:
        _transform(nnunet_model, ("image",))({"image": [record["image"], record["image"]]})
    assert "\n" not in str(err.value) and record["image"] in str(err.value)
    with pytest.raises(KeyError, match="allow_missing_keys"):
        _transform(nnunet_model)({"image": record["image"]})
    with pytest.raises(ValueError, match="no configuration '3d_lowres'"):
        NnUNetPreprocessd(("image",), nnunet_model["plans"], "3d_lowres", nnunet_model["dataset_json"])


def test_train_refuses_bad_input_before_running_nnunet(tmp_path):
    one = generate_msd_task(tmp_path / "one", "spleen", num_training=1, num_test=0, shape=(16, 16, 8), seed=0)
    with pytest.raises(ValueError, match="at least 2 training cases"):
        train_nnunet_model(one, tmp_path / "out1")
    two = generate_msd_task(tmp_path / "two", "spleen", num_training=2, num_test=0, shape=(16, 16, 8), seed=0)
    with pytest.raises(ValueError, match="fold must be"):
        train_nnunet_model(two, tmp_path / "out2", fold=2)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken"):
        train_nnunet_model(two, tmp_path / "taken")


def test_failing_nnunet_step_is_one_line_with_the_log_and_leaves_no_folder(tmp_path):
    task = generate_msd_task(tmp_path / "msd", "spleen", num_training=2, num_test=0, shape=(16, 16, 8), seed=0)
    (task / "imagesTs").rmdir()  # nnU-Net's MSD converter insists on the folder
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match=r"nnUNetv2_convert_MSD_dataset failed \(exit 1: .*imagesTs") as err:
        train_nnunet_model(task, out)
    message = str(err.value)
    assert "\n" not in message and message.endswith(f"full log: {out}.nnunet.log")
    assert Path(f"{out}.nnunet.log").read_text().count("imagesTs") >= 1
    assert not out.exists() and not list(tmp_path.glob(".model-*"))
