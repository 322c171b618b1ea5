"""End-to-end runs of every ``bundles/tatl_skin`` config with ``python -m monai.bundle run`` on tiny
generated ISIC data (64x64 working size, 1 epoch per network)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_cli import bundle_cli
from medxfer.data.isic import ISIC2017, ISIC2018, load_isic
from medxfer.transfer.weights import read_checkpoint as read_state_dict
from medxfer.workflows.bundle import bundle_dir, run_bundle

BUNDLE = bundle_dir("tatl_skin")
TINY = ["--working_size", "[64,64]", "--max_epochs", "1", "--n_folds", "3", "--folds", "[0]", "--batch_size", "4",
        "--tune_fraction", "0.2", "--device", "cpu"]


def _cli(config, tmp, *args, check=True):
    configs = config if isinstance(config, str) else "[" + ",".join(f"'{c}'" for c in config) + "]"
    return bundle_cli(BUNDLE, ["--config_file", configs, "--bundle_root", ".", *args], tmp, check=check)


def _pil(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def run2018(isic_roots, tmp_path_factory):
    """configs/tatl.yaml as documented: stages 1, 2, 3, U + Link, fold 0 of 3, ISIC 2018."""
    out = tmp_path_factory.mktemp("tatl") / "run"
    _cli("configs/tatl.yaml", out.parent, "--data_root", str(isic_roots[2018]), "--output_dir", str(out), *TINY)
    return out


def test_tatl_trains_every_network_in_stage_order_and_scores_the_test_fold(run2018):
    fold = run2018 / "fold_0"
    expected = {"segment_net"} | {f"agnostic_{a}" for a in ("unet_effb0", "linknet_effb0")} | {
        f"target_{t}_{a}" for t in ISIC2018.attributes for a in ("unet_effb0", "linknet_effb0")}
    assert {p.name for p in fold.iterdir() if p.is_dir()} == expected
    assert all((fold / d / "model.pt").is_file() and (fold / d / "history.json").is_file() for d in expected)
    test_ids = json.loads((run2018 / "splits.json").read_text())[0]["val"]
    boxes = json.loads((fold / "boxes.json").read_text())
    assert len(boxes) == 12  # every image of the fold (train, tune, test) has its Segment-Net box

    report = json.loads((run2018 / "cv_scores.json").read_text())
    assert report["stages"] == [1, 2, 3] and report["tatl_mode"] == "freeze" and not report["imagenet"]
    scores = report["folds"]["0"]
    for name in ISIC2018.attributes:
        s = scores[name]
        assert s["images"] == len(test_ids)
        denom = s["tp"] + s["fp"] + s["fn"]
        assert s["jaccard"] == (s["tp"] / denom if denom else None)  # pooled over the fold (JSON null = NaN)
        assert report["summary"][name]["jaccard_mean"] == s["jaccard"] or not denom
    assert _pil(run2018 / "cv_scores.png").ndim == 3
    rows = (run2018 / "cv_scores.csv").read_text().splitlines()
    assert rows[0].startswith("attribute,jaccard_mean") and len(rows) == 1 + 5 + 1


@pytest.mark.parametrize("arch", ["unet_effb0", "linknet_effb0"])
def test_stage3_started_from_stage2_and_freeze_kept_the_encoder(run2018, arch):
    fold = run2018 / "fold_0"
    stage2 = read_state_dict(fold / f"agnostic_{arch}" / "model.pt")
    stage3 = read_state_dict(fold / f"target_pigment_network_{arch}" / "model.pt")
    encoder = [k for k in stage2 if k.startswith("encoder.")]
    decoder = [k for k in stage2 if not k.startswith("encoder.") and stage2[k].is_floating_point()]
    assert encoder and decoder
    for key in encoder:  # weights and batch-norm statistics untouched by the stage-3 epoch
        assert torch.equal(stage2[key], stage3[key]), key
    assert any(not torch.equal(stage2[k], stage3[k]) for k in decoder)
    transfer = json.loads((fold / f"target_pigment_network_{arch}" / "transfer_report.json").read_text())
    assert len(transfer["loaded"]) == len(stage2) and len(transfer["frozen"]) > 0


def test_evaluate_reproduces_the_fold_scores(run2018, isic_roots, tmp_path):
    before = json.loads((run2018 / "fold_0" / "scores.json").read_text())
    _cli("configs/evaluate.yaml", tmp_path, "--run_dir", str(run2018), "--data_root", str(isic_roots[2018]),
         "--device", "cpu")
    assert json.loads((run2018 / "fold_0" / "scores.json").read_text()) == before
    with pytest.raises(Exception, match="ISIC 2018"):  # a run is scored on the data it was trained on
        run_bundle("tatl_skin", ["evaluate"], quiet=True, run_dir=str(run2018), data_root=str(isic_roots[2017]))


def test_inference_writes_masks_at_the_original_size_union_and_overlay(run2018, isic_roots, tmp_path):
    from medxfer.workflows.tatl_skin import fold_predictor

    images = tmp_path / "in"
    images.mkdir()
    records = load_isic(isic_roots[2018])[:3]
    for r in records:
        shutil.copy(r["image"], images)
    out = tmp_path / "pred"
    _cli("configs/inference.yaml", tmp_path, "--run_dir", str(run2018), "--input_dir", str(images),
         "--output_dir", str(out), "--device", "cpu")
    summary = json.loads((out / "predictions.json").read_text())
    # Segment-Net + 5 attributes x (U + Link) + the two stage-2 segmenters of the union map
    assert summary["networks"] == 13 and summary["union"] == "stage2"
    assert sorted(summary["images"]) == [r["id"] for r in records]
    predictor = fold_predictor(run2018, 0)  # the union networks are the fold's stage-2 checkpoints
    for net, arch in zip(predictor.union_networks, ("unet_effb0", "linknet_effb0")):
        saved = read_state_dict(run2018 / "fold_0" / f"agnostic_{arch}" / "model.pt")
        assert all(torch.equal(v.cpu(), saved[k]) for k, v in net.state_dict().items())
    for r in records:
        h, w = _pil(r["image"]).shape[:2]
        masks = np.stack([_pil(out / f"{r['id']}_attribute_{a}.png") for a in ISIC2018.attributes])
        assert masks.shape == (5, h, w) and set(np.unique(masks)) <= {0, 255}
        expected = predictor.predict(r["image"])
        np.testing.assert_array_equal(_pil(out / f"{r['id']}_union.png"), expected.union * 255)
        np.testing.assert_array_equal(masks, expected.masks * 255)
        assert _pil(out / f"{r['id']}_overlay.png").shape == (h, w, 3)
        box = summary["images"][r["id"]]["box"]
        outside = np.ones((h, w), bool)
        outside[box["row0"]:box["row1"], box["col0"]:box["col1"]] = False
        assert not masks[:, outside].any() and not _pil(out / f"{r['id']}_union.png")[outside].any()
    again = _cli("configs/inference.yaml", tmp_path, "--run_dir", str(run2018), "--input_dir", str(images),
                 "--output_dir", str(out), "--device", "cpu", check=False)
    assert again.returncode != 0 and "predictions.json: exists" in again.stderr
    # the named option: the OR of the attribute masks (dataset_dir: MONAI's name for the input)
    ored = tmp_path / "pred_or"
    _cli("configs/inference.yaml", tmp_path, "--run_dir", str(run2018), "--dataset_dir", str(images),
         "--output_dir", str(ored), "--device", "cpu", "--union", "or_stage3")
    assert json.loads((ored / "predictions.json").read_text())["networks"] == 11
    for r in records:
        masks = np.stack([_pil(ored / f"{r['id']}_attribute_{a}.png") for a in ISIC2018.attributes])
        np.testing.assert_array_equal(masks, np.stack([_pil(out / f"{r['id']}_attribute_{a}.png")
                                                       for a in ISIC2018.attributes]))
        np.testing.assert_array_equal(_pil(ored / f"{r['id']}_union.png"), masks.max(axis=0))


def test_train_config_alone_non_freeze_updates_the_encoder(run2018, isic_roots, tmp_path):
    stage2 = run2018 / "fold_0" / "agnostic_linknet_effb0" / "model.pt"
    out = tmp_path / "streaks_nf"
    _cli("configs/train.yaml", tmp_path, "--data_root", str(isic_roots[2018]), "--output_dir", str(out),
         "--target", "streaks", "--arch", "linknet_effb0", "--init_checkpoint", str(stage2), "--tatl_mode",
         "non_freeze", "--boxes_file", str(run2018 / "fold_0" / "boxes.json"), "--splits_file",
         str(run2018 / "splits.json"), "--working_size", "[64,64]", "--max_epochs", "2", "--batch_size", "4",
         "--tune_fraction", "0.2", "--n_folds", "3", "--device", "cpu")
    before, after = read_state_dict(stage2), read_state_dict(out / "model.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("encoder._blocks"))
    assert json.loads((out / "history.json").read_text())["epochs_run"] == 2


ABLATIONS = {  # config -> (networks of a fold, stage-3 initialised from stage 2)
    "ablation_stage3": ({"target"}, False),
    "ablation_stages23": ({"agnostic", "target"}, True),
    "ablation_stages13": ({"segment_net", "target"}, False),
    "ablation_stages123": ({"segment_net", "agnostic", "target"}, True),
    "ablation_no_imagenet": ({"segment_net", "agnostic", "target"}, True),
}


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_table3_ablations_on_isic2017(ablation, isic_roots, tmp_path):
    """Each Table 3 configuration, on ISIC 2017 (4 attributes), U-shape only to keep it short."""
    out = tmp_path / "run"
    _cli(["configs/tatl.yaml", f"configs/{ablation}.yaml"], tmp_path, "--data_root", str(isic_roots[2017]),
         "--output_dir", str(out), "--arches", "['unet_effb0']", *TINY)
    kinds, from_stage2 = ABLATIONS[ablation]
    fold = out / "fold_0"
    dirs = {p.name for p in fold.iterdir() if p.is_dir()}
    assert {d.split("_")[0] if not d.startswith("segment") else "segment_net" for d in dirs} == kinds
    assert {d for d in dirs if d.startswith("target_")} == {f"target_{a}_unet_effb0" for a in ISIC2017.attributes}
    assert (fold / "boxes.json").exists() == ("segment_net" in kinds)
    assert (fold / "target_streaks_unet_effb0" / "transfer_report.json").exists() == from_stage2
    report = json.loads((out / "cv_scores.json").read_text())
    assert sorted(report["folds"]["0"]) == sorted(ISIC2017.attributes) and report["year"] == 2017


def _broken_copy(isic_roots, tmp_path):
    root = tmp_path / "isic"
    shutil.copytree(isic_roots[2018], root)
    return root


def _train_error(root, tmp_path) -> str:
    proc = _cli("configs/train.yaml", tmp_path, "--data_root", str(root), "--output_dir", str(tmp_path / "o"),
                "--working_size", "[64,64]", "--max_epochs", "1", "--device", "cpu", check=False)
    assert proc.returncode != 0
    return proc.stderr


def test_missing_attribute_file_is_named(isic_roots, tmp_path):
    root = _broken_copy(isic_roots, tmp_path)
    gone = root / ISIC2018.task2_dir / "ISIC_0000004_attribute_streaks.png"
    gone.unlink()
    assert f"medxfer: {gone}: missing attribute mask 'streaks' of ISIC_0000004" in _train_error(root, tmp_path)


def test_mask_of_the_wrong_size_is_named(isic_roots, tmp_path):
    root = _broken_copy(isic_roots, tmp_path)
    mask = root / ISIC2018.task2_dir / "ISIC_0000002_attribute_globules.png"
    Image.fromarray(_pil(mask)[:-3]).save(mask)
    w, h = Image.open(root / ISIC2018.image_dir / "ISIC_0000002.jpg").size
    assert f"{mask}: mask is {w}x{h - 3} but image is {w}x{h}" in _train_error(root, tmp_path)


def test_non_isic_file_name_is_named(isic_roots, tmp_path):
    root = _broken_copy(isic_roots, tmp_path)
    odd = root / ISIC2018.image_dir / "holiday_photo.jpg"
    shutil.copy(root / ISIC2018.image_dir / "ISIC_0000000.jpg", odd)
    assert f"{odd}: file name is not an ISIC id" in _train_error(root, tmp_path)


def test_metadata_is_valid_and_the_networks_match_it(tmp_path):
    from medxfer.workflows.metadata import check_metadata

    assert check_metadata(BUNDLE / "configs" / "metadata.json") == []
    for arch in ("unet_effb0", "linknet_effb0"):  # (3, 32n, 32n) in -> (1, 32n, 32n) logits out
        proc = bundle_cli(BUNDLE, ["network_def", "--meta_file", "configs/metadata.json", "--config_file",
                                   "configs/train.yaml", "--bundle_root", ".", "--device", "cpu", "--n", "2",
                                   "--arch", arch, "--output_dir", str(tmp_path / arch)], tmp_path,
                          command="verify_net_in_out")
        assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


def test_a_given_segment_net_is_used_for_every_fold(run2018, isic_roots, tmp_path):
    given = run2018 / "fold_0" / "segment_net" / "model.pt"
    out = tmp_path / "run"
    _cli(["configs/tatl.yaml", "configs/ablation_stages13.yaml"], tmp_path, "--data_root", str(isic_roots[2018]),
         "--output_dir", str(out), "--segment_net", str(given), "--arches", "['unet_effb0']",
         *[a if a != "[0]" else "[1]" for a in TINY])
    seg = out / "fold_1" / "segment_net"
    assert (seg / "model.pt").read_bytes() == given.read_bytes() and not (seg / "history.json").exists()
    # same network, same images, same settings -> the boxes of run2018's fold 0 (all 12 images)
    assert json.loads((out / "fold_1" / "boxes.json").read_text()) == json.loads(
        (run2018 / "fold_0" / "boxes.json").read_text())
    bad = _cli(["configs/tatl.yaml"], tmp_path, "--data_root", str(isic_roots[2018]), "--output_dir",
               str(tmp_path / "bad"), "--segment_net", str(tmp_path / "missing.pt"), *TINY, check=False)
    assert bad.returncode != 0 and "missing.pt: Segment-Net checkpoint not found" in bad.stderr
