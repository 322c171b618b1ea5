"""Fault injection, data (issue 13, item 1): every workflow checks the cases it will use at the door.

Each fault is written into a copy of a tiny generated dataset and the real workflow is run: it must
stop with ONE line naming the bad file (DatasetError / NonFiniteLossError), before anything is
trained or written; a rerun on clean data reads no file again (the check cache).
"""

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

import medxfer.data.msd as msd
import medxfer.data.preflight as preflight
from bundle_cli import bundle_cli
from medxfer.data.problems import DatasetError
from medxfer.data.splits import fold_records
from medxfer.data.synth.isic import generate_isic
from medxfer.data.synth.msd import generate_msd_task
from medxfer.data.synth.shapes2d import generate_classification_folder, generate_seg2d
from medxfer.data.validate import check_task
from medxfer.handlers import NonFiniteLossError, ResumableCheckpointSaver, StopOnNonFiniteLoss
from medxfer.transferability.score import seg2d_target, target_cases
from medxfer.workflows import msd_seg3d as wf
from medxfer.workflows.bundle import bundle_dir, run_bundle
from medxfer.workflows.seg2d_transfer import classification_datalists, predict_folder, seg2d_datalists, target_images
from medxfer.workflows.tatl_skin import inference_images, tatl_datalists

FAST = {"num_workers": 0, "n_folds": 3, "patch_size": [32, 32, 16], "device": "cpu", "batch_size": 1,
        "num_samples": 1, "max_epochs": 1, "quiet": True, "cache_progress": False}
#: Plans as nnU-Net writes them for the tiny task (written by hand: planning costs ~15 s).
PLANS = {"task": "Task09_Spleen", "channels": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
         "plans_version": 1, "configuration": "3d_fullres", "target_spacing": [9.6, 9.6, 24.0],
         "patch_size": [32, 32, 16], "batch_size": 2, "median_shape": [32.0, 32.0, 12.0],
         "normalization": [{"channel": 0, "name": "CT", "nnunet_scheme": "CTNormalization", "scheme": "CT",
                            "clip": [-260.0, 150.0], "mean": 50.0, "std": 85.0}]}


@pytest.fixture(scope="module")
def clean_task(tmp_path_factory):
    root = generate_msd_task(tmp_path_factory.mktemp("clean"), "spleen", num_training=3, num_test=1,
                             shape=(32, 32, 12), spacing=(9.6, 9.6, 24.0), seed=4)
    (root / "medxfer_plans.json").write_text(json.dumps(PLANS))
    return root


@pytest.fixture
def task(clean_task, tmp_path):
    return Path(shutil.copytree(clean_task, tmp_path / "Task09_Spleen"))


def _files(task, i=1):
    return task / "imagesTr" / f"spleen_{i}.nii.gz", task / "labelsTr" / f"spleen_{i}.nii.gz"


def _rewrite(path, fn=None, affine=None, dtype=None):
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    data = fn(data.astype(dtype or data.dtype)) if fn else data
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), path)


def _one_line(err, path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(Path(path).resolve())), msg
    return msg


def _train_fails(task, out, exc=DatasetError, **kw):
    with pytest.raises(exc) as err:
        run_bundle("msd_seg3d", ["train"], data_root=str(task), output_dir=str(out), **{**FAST, **kw})
    assert not list(Path(out).glob("*.pt")), "a model was written"
    return err


# --- MSD: the faults of the issue, through the real training workflow ------------------------------

def test_nan_voxel_stops_training_naming_the_image(task, tmp_path):
    image, _ = _files(task, 2)

    def nan(a):
        a[3, 4, 5] = np.nan
        return a

    _rewrite(image, nan, dtype=np.float32)
    msg = _one_line(_train_fails(task, tmp_path / "run"), image)
    assert "1 voxel(s) are NaN" in msg


def test_nan_voxel_in_an_unplanned_task_is_named_before_nnunet_planning(task, tmp_path, monkeypatch):
    (task / "medxfer_plans.json").unlink()
    monkeypatch.setattr(wf, "plan_task", lambda *a, **k: pytest.fail("planned a task with a broken case"))
    image, _ = _files(task, 3)
    _rewrite(image, lambda a: np.where(a > a.mean(), np.inf, a), dtype=np.float32)
    with pytest.raises(DatasetError) as err:
        wf.task_plans(task)
    assert "NaN or infinite" in _one_line(err, image)


def test_label_shape_mismatch_once_plans_exist_is_named(task, tmp_path):
    image, label = _files(task, 1)
    _rewrite(label, lambda a: a[:, :, :-1])
    x, y, z = nib.load(image).shape
    msg = _one_line(_train_fails(task, tmp_path / "run"), image)
    assert msg.endswith(f"spatial shape {(x, y, z)} differs from spleen_1.nii.gz {(x, y, z - 1)}")


def test_all_background_labels_are_an_error(task, tmp_path):
    for i in (1, 2, 3):
        _rewrite(_files(task, i)[1], np.zeros_like)
    err = _train_fails(task, tmp_path / "run")
    train, _ = fold_records(msd.load_task(task).training, 0, 3, 0, tmp_path / "run" / "splits.json")
    msg = _one_line(err, train[0]["label"])
    assert msg.endswith("label has no foreground voxel, nor do the other 1 training case(s) of this run: nothing "
                        "to learn (wrong label files, or label values?)")


def test_one_background_case_warns_and_names_its_label(clean_task, tmp_path, caplog):
    task = Path(shutil.copytree(clean_task, tmp_path / "t" / "Task09_Spleen"))
    label = _files(task, 3)[1]
    _rewrite(label, np.zeros_like)
    with caplog.at_level(logging.WARNING, logger="medxfer.data"):
        train, val = wf.fold_datalists(task, n_folds=3, splits_file=tmp_path / "splits.json")
    assert len(train) == 2 and len(val) == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"{label.resolve()}: label has no foreground voxel (a background-only case)"]


def test_truncated_nifti_is_named_before_training(task, tmp_path):
    image, _ = _files(task, 3)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    msg = _one_line(_train_fails(task, tmp_path / "run"), image)
    assert "cannot read image" in msg


def test_spacing_x1000_fails_check_data_and_training(task, tmp_path):
    image, label = _files(task, 1)
    affine = nib.load(image).affine.copy()
    affine[:3, :3] *= 1000
    _rewrite(image, affine=affine)
    _rewrite(label, affine=affine)
    problems = check_task(task, progress=False).problems
    assert [p.path for p in problems] == [str(image.resolve()), str(label.resolve())]
    assert "outside the plausible 0.01-50 mm" in problems[0].reason
    msg = _one_line(_train_fails(task, tmp_path / "run"), image)
    assert "voxel spacing (" in msg and "(and 1 more problem(s)" in msg


def test_resampled_size_beyond_memory_is_named(task, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "physical_memory", lambda: 60_000)  # 30 kB per case: below one tiny case
    msg = _one_line(_train_fails(task, tmp_path / "run"), _files(task, 1)[0])
    assert "memory" in msg and "float32" in msg and "target spacing [9.6, 9.6, 24.0]" in msg
    # the numbers: 32-33 voxels in-plane at 9.24-10.3 mm resampled to 9.6 mm, 12 slices, image + label
    facts = preflight.check_task_records(msd.load_task(task), msd.load_task(task).training, memory=None)
    shape = preflight.resampled_shape(facts[0]["shape"], facts[0]["spacing"], PLANS["target_spacing"])
    assert shape[2] == 12 and f"{'x'.join(map(str, shape))} voxels x 2 array(s)" in msg


# --- non-finite loss -------------------------------------------------------------------------------

NAN_LOSS = "$lambda pred, label: (pred * float('nan')).mean()"


def test_nan_loss_stops_at_the_first_iteration_and_keeps_the_good_final_model(task, tmp_path):
    out = tmp_path / "run"
    run_bundle("msd_seg3d", ["train"], data_root=str(task), output_dir=str(out), **FAST)
    good = {p.name: p.read_bytes() for p in out.glob("*.pt")}
    assert {"checkpoint_epoch=1.pt", "model_final.pt"} <= set(good)
    with pytest.raises(NonFiniteLossError) as err:
        run_bundle("msd_seg3d", ["train"], data_root=str(task), output_dir=str(out), loss=NAN_LOSS,
                   **{**FAST, "max_epochs": 2})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("training loss is nan at epoch 2, iteration 3 (batch: spleen_")
    assert "imagesTr/spleen_" in msg  # the file too
    # no model file replaced by NaN weights, none deleted, none added (no checkpoint_epoch=2.pt)
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == good


def test_final_saver_writes_nothing_on_a_non_finite_loss_and_saves_on_other_errors(tmp_path):
    net = torch.nn.Linear(2, 1)

    def step(engine, batch):
        return {"loss": torch.tensor(float("inf")) if engine.state.iteration == 2 else torch.tensor(1.0)}

    def broken(engine, batch):
        raise RuntimeError("disk")

    for fail, saved in ((None, False), (RuntimeError, True)):
        engine = Engine(step if fail is None else broken)
        ResumableCheckpointSaver(str(tmp_path / str(saved)), {"network": net}, save_final=True,
                                 final_filename="model_final.pt").attach(engine)  # the first EXCEPTION_RAISED handler
        StopOnNonFiniteLoss().attach(engine)
        with pytest.raises(NonFiniteLossError if fail is None else RuntimeError) as err:
            engine.run([{"id": ["case_a", "case_b"]}] * 3, max_epochs=1)
        assert (tmp_path / str(saved) / "model_final.pt").exists() is saved
        if fail is None:
            assert str(err.value).startswith("training loss is inf at epoch 1, iteration 2 (batch: case_a, case_b)")


def test_non_finite_weights_stop_at_the_epoch_end_before_later_handlers(tmp_path):
    net = torch.nn.Linear(2, 1)
    later = []

    def step(engine, batch):
        if engine.state.iteration == 2:
            with torch.no_grad():
                net.weight[0, 1] = float("nan")  # a step that left the weights NaN, its loss still finite
        return {"loss": torch.tensor(0.5)}

    engine = Engine(step)
    StopOnNonFiniteLoss(network=net).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: later.append(e.state.epoch))
    with pytest.raises(NonFiniteLossError) as err:
        engine.run([{"id": ["x_7"]}] * 2, max_epochs=2)
    assert str(err.value).startswith("1 weight tensor(s) of the network (e.g. weight) are NaN / inf at the end of "
                                     "epoch 1 (last epoch 1, iteration 2 (batch: x_7))")
    assert later == []  # the saver / validation attached after it never saw the NaN weights


# --- the cache -------------------------------------------------------------------------------------

def test_rerun_reads_no_file_changed_file_is_read_again_read_only_folder_skips_cache(task, tmp_path, monkeypatch):
    reads = []
    real = msd.read_volume
    monkeypatch.setattr(msd, "read_volume", lambda p: reads.append(Path(p).name) or real(p))
    splits = tmp_path / "splits.json"
    wf.fold_datalists(task, n_folds=3, splits_file=splits)
    assert len(reads) == 6 and (task / preflight.CACHE_FILE).is_file()  # 3 images + 3 labels
    reads.clear()
    wf.fold_datalists(task, n_folds=3, splits_file=splits)
    wf.fold_datalists(task, n_folds=3, splits_file=splits, plans=PLANS)  # the memory check uses the cached facts
    assert reads == []
    _rewrite(_files(task, 2)[0], lambda a: a + 1)
    wf.fold_datalists(task, n_folds=3, splits_file=splits)
    assert sorted(reads) == ["spleen_2.nii.gz", "spleen_2.nii.gz"]

    (task / preflight.CACHE_FILE).unlink()
    reads.clear()

    def read_only(path, text, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(preflight, "atomic_write_text", read_only)
    wf.fold_datalists(task, n_folds=3, splits_file=splits)  # no error, no cache
    wf.fold_datalists(task, n_folds=3, splits_file=splits)
    assert len(reads) == 12 and not (task / preflight.CACHE_FILE).exists()


# --- the other doors -------------------------------------------------------------------------------

def test_inference_and_scoring_doors_name_the_bad_file(task, tmp_path):
    test_image = task / "imagesTs" / "spleen_4.nii.gz"
    _rewrite(test_image, lambda a: np.where(a > 0, np.inf, a), dtype=np.float32)
    for source in (task, task / "imagesTs", test_image):
        with pytest.raises(DatasetError) as err:
            wf.inference_datalist(source)
        assert "voxel(s) are NaN or infinite" in _one_line(err, test_image)
    image, _ = _files(task, 1)
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(DatasetError) as err:
        target_cases(task, PLANS)
    assert "cannot read image" in _one_line(err, image)


def _truncate_body(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # header intact: the loaders' header checks pass


def test_isic_unreadable_image_and_mask_size_are_named(tmp_path):
    root = generate_isic(tmp_path / "isic", year=2018, num_images=6, size=(48, 64), seed=0)
    image = sorted((root / "ISIC2018_Task1-2_Training_Input").glob("ISIC_*.jpg"))[2]
    _truncate_body(image)
    with pytest.raises(DatasetError) as err:
        tatl_datalists(root, fold=0, n_folds=3, splits_file=tmp_path / "splits.json")
    assert "cannot read image" in _one_line(err, image)
    image.unlink()
    shutil.copy(sorted(image.parent.glob("ISIC_*.jpg"))[0], image)
    mask = sorted((root / "ISIC2018_Task2_Training_GroundTruth_v3").glob("*.png"))[0]
    from PIL import Image

    Image.new("L", (10, 10)).save(mask)
    with pytest.raises(DatasetError) as err:
        tatl_datalists(root, fold=0, n_folds=3, splits_file=tmp_path / "splits.json")
    assert "mask is 10x10 but image is" in _one_line(err, mask)


def test_seg2d_unreadable_image_and_mask_size_are_named(tmp_path):
    root = generate_seg2d(tmp_path / "seg", num_images=6, size=(32, 32), seed=0, grey=False)
    image = sorted((root / "images").iterdir())[1]
    _truncate_body(image)
    for door in (lambda: seg2d_datalists(root, n_folds=3, splits_file=tmp_path / "s.json"),
                 lambda: seg2d_target(root, 32, max_cases=None)):
        with pytest.raises(DatasetError) as err:
            door()
        assert "cannot read image" in _one_line(err, image)
    shutil.copy(sorted((root / "images").iterdir())[0], image)
    mask = root / "masks" / f"{image.stem}.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(mask)
    with pytest.raises(DatasetError) as err:
        seg2d_datalists(root, n_folds=3, splits_file=tmp_path / "s.json")
    assert "mask is 8x8 but image" in _one_line(err, mask)


def test_pretraining_image_folder_truncated_image_is_named(tmp_path):
    root = generate_classification_folder(tmp_path / "cls", num_classes=2, images_per_class=4, size=32, seed=0)
    image = sorted((root / sorted(p.name for p in root.iterdir() if p.is_dir())[1]).iterdir())[0]
    _truncate_body(image)
    with pytest.raises(DatasetError) as err:
        classification_datalists(root, val_fraction=0.25)
    assert "cannot read image" in _one_line(err, image)


def test_2d_inference_inputs_are_checked_before_any_network_loads(tmp_path):
    root = generate_seg2d(tmp_path / "seg", num_images=4, size=(32, 32), seed=0, grey=False)
    image = sorted((root / "images").iterdir())[2]
    _truncate_body(image)
    # the run folder does not even exist: the inputs are checked first
    for door in (lambda: predict_folder(tmp_path / "no_run", root / "images", tmp_path / "pred"),
                 lambda: inference_images(root / "images"),
                 lambda: target_images(root, 32)):
        with pytest.raises(DatasetError) as err:
            door()
        assert "cannot read image" in _one_line(err, image)
    assert not (tmp_path / "pred").exists()


# --- the documented CLI path -----------------------------------------------------------------------

def test_bundle_cli_exits_non_zero_naming_the_nan_image(task, tmp_path):
    image, _ = _files(task, 1)
    _rewrite(image, lambda a: np.full_like(a, np.nan), dtype=np.float32)
    proc = bundle_cli(bundle_dir("msd_seg3d"), ["--config_file", "configs/train.yaml", "--bundle_root", ".",
                                                "--data_root", str(task), "--output_dir", str(tmp_path / "run"),
                                                "--max_epochs", "1", "--n_folds", "3", "--device", "cpu",
                                                "--patch_size", "[32, 32, 16]"], tmp_path, check=False)
    assert proc.returncode != 0
    assert f"{image.resolve()}: " in proc.stderr and "voxel(s) are NaN or infinite" in proc.stderr
    assert not list((tmp_path / "run").glob("*.pt"))
