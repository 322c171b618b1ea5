"""TATL workflow pieces: lesion crop in the data chain, stage targets, fold datalists, settings,
the inference pipeline (U + Link averaging, paste back, the stage-2 union map, PNG output) with
stand-in networks."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medxfer.data.isic import ISIC2018, load_isic
from medxfer.data.problems import DatasetError
from medxfer.transfer.tatl import TATL_ARCHS, stage_network
from medxfer.transfer.tatl_inference import TatlPredictor, write_prediction
from medxfer.transforms.dermoscopy import CropToBoxd, dermoscopy_transforms
from medxfer.transforms.lesion_crop import Box, lesion_box, save_boxes
from medxfer.workflows import tatl_skin as ts


def _pil(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_crop_to_box_takes_exactly_the_box_pixels_of_the_file(isic_roots):
    record = load_isic(isic_roots[2018], year=2018)[0]
    box = Box(3, 5, 30, 41)
    chain = dermoscopy_transforms("eval", size=None, mask_keys=["lesion"], box_key="box",
                                  mean=(0, 0, 0), std=(1, 1, 1))
    out = chain({**record, "box": box.to_dict()})
    rgb, lesion = _pil(record["image"]), _pil(record["lesion"])
    assert tuple(out["image"].shape) == (3, 27, 36)
    np.testing.assert_allclose(out["image"].numpy(), rgb[3:30, 5:41].transpose(2, 0, 1) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(out["lesion"][0].numpy(), (lesion[3:30, 5:41] > 0).astype(np.float32))
    # no box -> whole image; a box outside the image names the file
    assert tuple(chain(record)["image"].shape[1:]) == rgb.shape[:2]
    with pytest.raises(ValueError, match=record["image"].split("/")[-1] + ".*outside"):
        CropToBoxd(["image"])({"image": chain(record)["image"], "box": Box(0, 0, 999, 10)})


def test_stage_targets_lesion_union_and_one_attribute(isic_roots):
    record = load_isic(isic_roots[2018], year=2018)[1]
    attrs = ISIC2018.attributes
    masks = np.stack([_pil(record["attributes"][a]) > 0 for a in attrs])
    assert masks.any(), "test data should have at least one attribute on this image"
    union = ts.stage_transforms("eval", "union", 2018, working_size=None)(record)["label"]
    np.testing.assert_array_equal(union.numpy(), masks.any(axis=0, keepdims=True).astype(np.float32))
    single = ts.stage_transforms("eval", attrs[3], 2018, working_size=None)(record)["label"]
    np.testing.assert_array_equal(single[0].numpy(), masks[3].astype(np.float32))
    lesion = ts.stage_transforms("eval", "lesion", 2018, working_size=(32, 64))(record)["label"]
    assert tuple(lesion.shape) == (1, 32, 64)
    with pytest.raises(ValueError, match="globules"):
        ts.target_masks("globules", 2017)  # ISIC 2017 has no globules


def test_fold_datalists_hold_out_tuning_images_and_attach_boxes(isic_roots, tmp_path):
    root = isic_roots[2018]
    lists = ts.tatl_datalists(root, fold=1, n_folds=3, seed=0, splits_file=tmp_path / "splits.json", tune_fraction=0.2)
    ids = {k: {r["id"] for r in v} for k, v in lists.items()}
    assert sum(len(v) for v in ids.values()) == 12 and not (ids["train"] & ids["tune"] or ids["train"] & ids["test"])
    assert len(ids["tune"]) == 2 and len(ids["test"]) == 4
    assert ids["test"] == set(json.loads((tmp_path / "splits.json").read_text())[1]["val"])
    boxes = {r["id"]: Box(1, 2, 10, 20) for r in load_isic(root)}
    save_boxes(boxes, tmp_path / "boxes.json")
    with_boxes = ts.tatl_datalists(root, 1, 3, 0, tmp_path / "splits.json", tmp_path / "boxes.json", 0.2)
    assert all(r["box"] == Box(1, 2, 10, 20).to_dict() for v in with_boxes.values() for r in v)
    boxes.pop(sorted(boxes)[0])
    save_boxes(boxes, tmp_path / "boxes.json")
    with pytest.raises(DatasetError, match="boxes.json.*no lesion box"):
        ts.tatl_datalists(root, 1, 3, 0, tmp_path / "splits.json", tmp_path / "boxes.json", 0.2)


def test_settings_are_checked_and_a_run_folder_keeps_its_settings(tmp_path):
    with pytest.raises(ValueError, match="contains 3"):
        ts.TatlSettings(stages=(1, 2))
    with pytest.raises(ValueError, match="multiples of 32"):
        ts.TatlSettings(working_size=(100, 128))
    with pytest.raises(ValueError, match="arches"):
        ts.TatlSettings(arches=("unet",))
    with pytest.raises(FileNotFoundError, match="ImageNet weights"):
        ts.TatlSettings(imagenet_weights=str(tmp_path / "nope.pth"))
    ts._claim_run_dir(tmp_path, ts.TatlSettings(stages=[3]))
    ts._claim_run_dir(tmp_path, ts.TatlSettings(stages=[3]))  # same settings: resume
    with pytest.raises(FileExistsError, match="stages"):
        ts._claim_run_dir(tmp_path, ts.TatlSettings(stages=[1, 2, 3]))
    assert ts.TatlSettings.load(tmp_path).stages == (3,)


def test_stage_network_reads_the_encoder_from_a_local_imagenet_file(tmp_path):
    from medxfer.networks.effnet_unet import unet_effb0

    source = unet_effb0()
    torch.save(source.state_dict(), tmp_path / "encoder.pth")
    for arch in TATL_ARCHS:
        net = stage_network(arch, imagenet_weights=tmp_path / "encoder.pth")
        src = source.state_dict()
        for key, value in net.state_dict().items():
            if key.startswith("encoder.") and "num_batches_tracked" not in key:
                assert torch.equal(value, src[key]), key


class _Constant(torch.nn.Module):
    """Stand-in target segmenter: probability ``p`` everywhere (logit), input size kept."""

    def __init__(self, p):
        super().__init__()
        self.logit = float(np.log(p / (1 - p)))
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return torch.full((x.shape[0], 1, *x.shape[2:]), self.logit)


class _Rect(torch.nn.Module):
    """Stand-in Segment-Net: lesion = a fixed rectangle of the working frame."""

    def __init__(self, rect):
        super().__init__()
        self.rect = rect

    def forward(self, x):
        out = torch.full((x.shape[0], 1, *x.shape[2:]), -10.0)
        r0, c0, r1, c1 = self.rect
        out[:, :, r0:r1, c0:c1] = 10.0
        return out


def test_predictor_averages_shapes_inside_the_lesion_box_and_pastes_back(isic_roots, tmp_path):
    record = load_isic(isic_roots[2018], year=2018)[2]
    h, w = _pil(record["image"]).shape[:2]
    working = (64, 96)
    u, link = _Constant(0.8), _Constant(0.3)   # mean 0.55 >= 0.5 -> attribute everywhere in the box
    low = [_Constant(0.2), _Constant(0.3)]     # mean 0.25 -> nothing
    predictor = TatlPredictor({"pigment_network": [u, link], "streaks": low}, _Rect((16, 24, 40, 60)), working,
                              offset=4, union="or_stage3")
    pred = predictor.predict(record["image"])
    rect = np.zeros(working, bool)
    rect[16:40, 24:60] = True
    box = lesion_box(rect, offset=4, image_size=(h, w))
    assert pred.box == box and pred.probabilities.shape == (2, h, w)
    inside = np.zeros((h, w), bool)
    inside[box.as_slices()] = True
    np.testing.assert_allclose(pred.probabilities[0][inside], 0.55, atol=1e-5)
    np.testing.assert_allclose(pred.probabilities[1][inside], 0.25, atol=1e-5)
    assert not pred.probabilities[:, ~inside].any()
    np.testing.assert_array_equal(pred.union, inside)
    assert u.seen == [(1, 3, *working)] and predictor.n_networks == 5

    files = write_prediction(pred, record["image"], tmp_path, record["id"])
    names = sorted(p.name for p in files)
    assert names == sorted([f"{record['id']}_attribute_pigment_network.png", f"{record['id']}_attribute_streaks.png",
                            f"{record['id']}_union.png", f"{record['id']}_overlay.png"])
    np.testing.assert_array_equal(_pil(tmp_path / f"{record['id']}_attribute_pigment_network.png"), inside * 255)
    assert _pil(tmp_path / f"{record['id']}_overlay.png").shape == (h, w, 3)
    with pytest.raises(FileExistsError, match="_attribute_pigment_network.png"):
        write_prediction(pred, record["image"], tmp_path, record["id"])
    # without a Segment-Net the whole image is the box (Table 3 ablations without stage 1)
    whole = TatlPredictor({"streaks": [_Constant(0.9)]}, None, working, union="or_stage3").predict(record["image"])
    assert whole.box == Box(0, 0, h, w) and whole.masks.all()


def _box_and_inside(record, working, rect=(16, 24, 40, 60), offset=4):
    h, w = _pil(record["image"]).shape[:2]
    mask = np.zeros(working, bool)
    mask[rect[0]:rect[2], rect[1]:rect[3]] = True
    box = lesion_box(mask, offset=offset, image_size=(h, w))
    inside = np.zeros((h, w), bool)
    inside[box.as_slices()] = True
    return box, inside


def test_union_map_is_the_stage2_segmenters_averaged_prediction(isic_roots):
    """Paper section 6 / Fig. 9: the union map comes from the attribute-agnostic segmenters (U + Link
    averaged like the target segmenters), not from the attribute masks."""
    record = load_isic(isic_roots[2018], year=2018)[2]
    working = (64, 96)
    box, inside = _box_and_inside(record, working)
    targets = {"pigment_network": [_Constant(0.8), _Constant(0.3)],   # mean 0.55: attribute in the box
               "streaks": [_Constant(0.2), _Constant(0.3)]}           # mean 0.25: nothing
    agnostic = [_Constant(0.9), _Constant(0.5)]                        # mean 0.7
    pred = TatlPredictor(targets, _Rect((16, 24, 40, 60)), working, offset=4, union_networks=agnostic).predict(
        record["image"])
    assert pred.box == box and pred.union_probability.shape == inside.shape
    np.testing.assert_allclose(pred.union_probability[inside], (0.9 + 0.5) / 2, atol=1e-5)
    assert not pred.union_probability[~inside].any()  # pasted back: zero outside the crop
    np.testing.assert_array_equal(pred.union, inside)
    assert agnostic[0].seen == [(1, 3, *working)]  # the stage-2 networks see the same crop

    # stage 2 finds nothing (mean 0.3) although an attribute mask is set: the union map follows stage 2
    low = TatlPredictor(targets, _Rect((16, 24, 40, 60)), working, offset=4,
                        union_networks=[_Constant(0.1), _Constant(0.5)]).predict(record["image"])
    assert low.masks[0][inside].all() and not low.union.any()
    np.testing.assert_allclose(low.union_probability[inside], 0.3, atol=1e-5)
    # or_stage3 (named option): the OR of the attribute masks, stage-2 networks never run
    unused = _Constant(0.1)
    ored = TatlPredictor(targets, _Rect((16, 24, 40, 60)), working, offset=4, union_networks=[unused],
                         union="or_stage3")
    result = ored.predict(record["image"])
    assert result.union_probability is None and unused.seen == [] and ored.n_networks == 5
    np.testing.assert_array_equal(result.union, result.masks.any(axis=0))
    with pytest.raises(ValueError, match="needs the stage-2 attribute-agnostic segmenters"):
        TatlPredictor(targets, None, working)
    with pytest.raises(ValueError, match="union must be one of"):
        TatlPredictor(targets, None, working, union="and")


def test_fold_predictor_takes_the_union_from_the_fold_stage2_networks(isic_roots, tmp_path, monkeypatch):
    """fold_predictor loads agnostic_<arch>/model.pt of the fold for the union map (stand-ins by path)."""
    run = tmp_path / "run"
    (run / "fold_0").mkdir(parents=True)
    settings = ts.TatlSettings(working_size=(64, 96), offset=4, year=2018)
    (run / "tatl_run.json").write_text(json.dumps(settings.to_json()))
    probability = {"agnostic_unet_effb0": 0.9, "agnostic_linknet_effb0": 0.7}  # mean 0.8
    loaded = []

    def load_trained(arch, path, device="cpu", decoder_block=None, network=None):
        name = path.parent.name
        loaded.append(name)
        if name == "segment_net":
            return _Rect((16, 24, 40, 60))
        return _Constant(probability.get(name, 0.2))

    monkeypatch.setattr(ts, "load_trained", load_trained)
    record = load_isic(isic_roots[2018], year=2018)[2]
    _, inside = _box_and_inside(record, (64, 96))
    predictor = ts.fold_predictor(run, 0)
    assert sorted(n for n in loaded if n.startswith("agnostic_")) == sorted(probability)
    pred = predictor.predict(record["image"])
    np.testing.assert_allclose(pred.union_probability[inside], 0.8, atol=1e-5)
    assert not pred.masks.any() and pred.union[inside].all()  # no attribute, yet a union region
    loaded.clear()
    ts.fold_predictor(run, 0, union="or_stage3")
    assert not [n for n in loaded if n.startswith("agnostic_")]
    # a run without stage 2 (Table 3 ablation) has no attribute-agnostic segmenter
    (run / "tatl_run.json").write_text(json.dumps({**settings.to_json(), "stages": [1, 3]}))
    with pytest.raises(ValueError, match="no stage 2 .* use union 'or_stage3'"):
        ts.fold_predictor(run, 0)


def test_runs_from_before_decoder_block_load_as_linknet(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = ts.TatlSettings().to_json()
    del old["decoder_block"]
    (run / "tatl_run.json").write_text(json.dumps(old))
    assert ts.TatlSettings.load(run).decoder_block == "linknet" and ts.run_decoder_block(run) == "linknet"
    ts._claim_run_dir(run, ts.TatlSettings(decoder_block="linknet"))  # resumes: same settings
    with pytest.raises(FileExistsError, match="decoder_block"):
        ts._claim_run_dir(run, ts.TatlSettings())
    assert ts.run_decoder_block(tmp_path / "none") == "paper"
    with pytest.raises(ValueError, match="decoder_block must be one of"):
        ts.TatlSettings(decoder_block="unet")


def test_inference_images_skip_masks_and_complain_about_empty_folders(isic_roots, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(load_isic(isic_roots[2018])[0]["image"], folder / "ISIC_0000000.jpg")
    (folder / "ISIC_0000000_overlay.png").write_bytes(b"")
    (folder / "notes.txt").write_text("x")
    assert [p.name for p in ts.inference_images(folder)] == ["ISIC_0000000.jpg"]
    (folder / "ISIC_0000000.jpg").unlink()
    with pytest.raises(DatasetError, match="no image files"):
        ts.inference_images(folder)
    with pytest.raises(FileNotFoundError, match="no such image"):
        ts.inference_images(tmp_path / "missing")


def test_metric_history_records_rounds_and_the_best(tmp_path):
    from types import SimpleNamespace

    from medxfer.handlers import MetricHistory

    trainer = SimpleNamespace(state=SimpleNamespace(epoch=0))
    hist = MetricHistory(tmp_path / "h.json", "val_score", "max", trainer)
    for epoch, score in enumerate([0.2, 0.5, 0.4], start=1):
        trainer.state.epoch = epoch
        hist(SimpleNamespace(state=SimpleNamespace(metrics={"val_score": score})))
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["best"] == {"epoch": 2, "val_score": 0.5} and data["epochs_run"] == 3


def test_a_network_is_trained_again_unless_its_done_marker_records_the_same_inputs(tmp_path, monkeypatch):
    from pathlib import Path

    runs = []

    def train(bundle_root, configs, quiet=False, output_dir=None, **overrides):  # stands in for configs/train.yaml
        runs.append(output_dir)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.pt").write_bytes(b"weights %d" % len(runs))

    monkeypatch.setattr(ts, "run_bundle", train)
    init = tmp_path / "agnostic_unet_effb0" / "model.pt"
    init.parent.mkdir()
    init.write_bytes(b"stage 2")
    net = tmp_path / "target_streaks_unet_effb0"
    overrides = {"fold": 0, "arch": "unet_effb0", "target": "streaks", "init_checkpoint": str(init),
                 "device": "cpu", "cache_progress": False}
    first = ts._train_one("tatl_skin", net, overrides, quiet=True)
    assert len(runs) == 1 and first["for"]["init_checkpoint"] == {"sha256": ts._sha256(init)}
    assert ts._train_one("tatl_skin", net, {**overrides, "device": "cuda"}, True) == first  # device: not an input
    (net / "stale.txt").write_text("left by a killed run")
    (net / "done.json").write_text('{"for": {"fold"')  # a torn or foreign marker is not trusted
    ts._train_one("tatl_skin", net, overrides, True)
    assert len(runs) == 2 and not (net / "stale.txt").exists()  # retrained from scratch, in an emptied folder
    init.write_bytes(b"stage 2, retrained")  # what it was trained from changed
    ts._train_one("tatl_skin", net, overrides, True)
    assert len(runs) == 3 and json.loads((net / "done.json").read_text())["for"]["init_checkpoint"]["sha256"] == ts._sha256(init)
