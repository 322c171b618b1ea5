"""``bundles/seg2d_transfer`` end to end with ``python -m monai.bundle run`` on tiny generated data:
encoder pretraining into a bank with online robustness selection, offline selection, downstream
training (full / decoder-only / scratch), evaluation and inference."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_cli import bundle_cli
from medxfer.data.synth.shapes2d import generate_classification_folder, generate_seg2d
from medxfer.transfer.bank import ModelBank
from medxfer.transfer.weights import read_checkpoint as read_state_dict
from medxfer.transferability.robustness import first_local_maximum
from medxfer.workflows.bundle import bundle_dir

BUNDLE = bundle_dir("seg2d_transfer")
NARROW = "{'channels': [8, 16, 32, 64, 128]}"   # a narrow unet2d keeps checkpoints small
COMMON = ["--bundle_root", ".", "--arch", "unet2d", "--arch_kwargs", NARROW, "--image_size", "32", "--device", "cpu"]


def _cli(configs, tmp, *args, check=True):
    configs = configs if isinstance(configs, str) else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    return bundle_cli(BUNDLE, ["--config_file", configs, *args], tmp, check=check)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg2d_data")
    return {"classes": generate_classification_folder(root / "classes", num_classes=4, images_per_class=8, size=32,
                                                      seed=0),
            "binary": generate_seg2d(root / "binary", num_images=12, size=(40, 48), num_classes=1, seed=1),
            "multi": generate_seg2d(root / "multi", num_images=12, size=(40, 48), num_classes=2, seed=2),
            "root": root}


@pytest.fixture(scope="module")
def pretrained(data):
    """pretrain_encoder.yaml + online_selection.yaml: checkpoint every epoch, stop at the first maximum."""
    out = data["root"] / "pretrain"
    _cli(["configs/pretrain_encoder.yaml", "configs/online_selection.yaml"], out.parent, *COMMON,
         "--data_root", str(data["classes"]), "--bank_root", str(out / "bank"), "--output_dir", str(out),
         "--target_root", str(data["binary"]), "--max_epochs", "10", "--bank_epochs", str(list(range(1, 11))),
         "--batch_size", "8")
    return out


def test_online_selection_stopped_a_real_pretraining_at_the_first_robustness_maximum(pretrained):
    summary = json.loads((pretrained / "robustness.json").read_text())
    epochs, scores = summary["epochs"], summary["robustness"]
    assert epochs[0] == 0 and summary["selected_epoch"] is not None, "this tiny run is known to peak early"
    assert summary["selected_epoch"] == first_local_maximum(scores, epochs, start_epoch=1) >= 1
    assert summary["stopped_at_epoch"] == summary["selected_epoch"] + 1 == epochs[-1] < 10  # one round later
    bank = ModelBank.open(pretrained / "bank")
    assert sorted(bank.get(n).epoch for n in bank.names()) == list(range(1, epochs[-1] + 1))  # nothing after the stop
    chosen = read_state_dict(pretrained / "robust_selected.pt")
    entry = next(n for n in bank.names() if bank.get(n).epoch == summary["selected_epoch"])
    saved = bank.load_state_dict(entry)
    assert chosen.keys() == saved.keys() and all(torch.equal(chosen[k], saved[k]) for k in saved)


def test_offline_selection_scores_every_checkpoint_and_reports_tis(pretrained, data, tmp_path):
    bank = ModelBank.open(pretrained / "bank")
    online = json.loads((pretrained / "robustness.json").read_text())
    names = sorted(bank.names(), key=lambda n: bank.get(n).epoch)
    robust_online = dict(zip(online["epochs"], online["robustness"]))
    dice = tmp_path / "dice.csv"   # a made-up Dice ordered like the online robustness -> TIS 1
    with dice.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "dice"])
        for n in names:
            w.writerow([n, robust_online[bank.get(n).epoch]])
    out = tmp_path / "selection"
    _cli("configs/select_checkpoint.yaml", tmp_path, "--bundle_root", ".", "--bank_root", str(pretrained / "bank"),
         "--target_root", str(data["binary"]), "--output_dir", str(out), "--image_size", "32",
         "--dice_csv", str(dice), "--device", "cpu", "--start_epoch", "1")
    rows = json.loads((out / "scores.json").read_text())["rows"]
    # the random init (epoch 0) is an offline candidate, before the bank's checkpoints
    assert [r["model"] for r in rows] == ["unet2d_random_init"] + bank.names() and rows[0]["epoch"] == 0
    for r in rows[1:]:  # offline robustness of epoch k == what the online rule measured after epoch k
        assert r["robustness"] == pytest.approx(robust_online[r["epoch"]], abs=1e-6)
    for r in rows:
        assert all(np.isfinite(r[e]) for e in ("robustness", "ccfv", "logme", "gbc", "transrate"))
    selection = json.loads((out / "selection.json").read_text())
    best = max(rows[1:], key=lambda r: r["robustness"])
    assert selection["model"] == best["model"] and selection["select_by"] == "robustness"
    assert selection["tis"]["robustness"] == pytest.approx(1.0)


# the thesis' "full fine-tuning" from an encoder checkpoint is transfer mode encoder_only (mode full
# would require the decoder and head too, which an encoder checkpoint does not have: refused)
@pytest.mark.parametrize("mode", ["encoder_only", "decoder_only"])
def test_train_from_a_bank_checkpoint_full_or_decoder_only(pretrained, data, tmp_path, mode):
    bank = ModelBank.open(pretrained / "bank")
    entry = bank.names()[0]
    out = tmp_path / mode
    _cli("configs/train.yaml", tmp_path, *COMMON, "--data_root", str(data["binary"]), "--bank_root",
         str(pretrained / "bank"), "--init_entry", entry, "--transfer_mode", mode, "--output_dir", str(out),
         "--max_epochs", "2", "--batch_size", "4", "--n_folds", "3")
    source, trained = bank.load_state_dict(entry), read_state_dict(out / "model.pt")
    weights = [k for k in source if k.startswith("encoder.") and k.endswith("weight")]
    unchanged = [torch.equal(source[k], trained[k]) for k in weights]
    assert all(unchanged) if mode == "decoder_only" else not any(unchanged)
    assert json.loads((out / "transfer_report.json").read_text())["counts"]["loaded"] == sum(
        1 for k in source if k.startswith("encoder."))
    assert json.loads((out / "history.json").read_text())["epochs_run"] == 2
    transfer = json.loads((out / "run.json").read_text())["transfer"]
    assert (transfer["init_entry"], transfer["mode"], transfer["entry_sha256"]) == (entry, mode, bank.get(entry).sha256)


def test_multiclass_grey_scratch_training_evaluation_and_inference(data, tmp_path):
    run = tmp_path / "run"
    _cli("configs/train.yaml", tmp_path, *COMMON, "--data_root", str(data["multi"]), "--transfer_mode", "scratch",
         "--output_dir", str(run), "--max_epochs", "1", "--val_interval", "2", "--batch_size", "4", "--n_folds", "3")
    # shorter than val_interval: model.pt holds the final weights, and says so; run.json describes the run
    assert json.loads((run / "model.json").read_text())["note"] == "model.pt = final weights, no validation ran"
    record = json.loads((run / "run.json").read_text())
    assert (record["arch"], record["arch_kwargs"], record["transfer"]) == ("unet2d", {"channels": [8, 16, 32, 64, 128]}, None)
    assert (record["settings"]["max_epochs"], record["settings"]["fold"]) == (1, 0)
    _cli("configs/evaluate.yaml", tmp_path, "--bundle_root", ".", "--run_dir", str(run), "--data_root",
         str(data["multi"]), "--device", "cpu")
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    val_ids = json.loads((run / "splits.json").read_text())[0]["val"]
    assert [c["case"] for c in metrics["cases"]] == val_ids
    assert {"dice_blob", "dice_stripes", "hd95_blob", "hd95_stripes"} <= set(metrics["summary"])
    out = tmp_path / "pred"
    _cli("configs/inference.yaml", tmp_path, "--bundle_root", ".", "--run_dir", str(run), "--input_dir",
         str(data["multi"] / "images"), "--output_dir", str(out), "--device", "cpu")
    for image in sorted((data["multi"] / "images").iterdir()):
        pred = np.asarray(Image.open(out / f"{image.stem}.png"))
        assert pred.shape == np.asarray(Image.open(image)).shape[:2] and set(np.unique(pred)) <= {0, 1, 2}
    again = _cli("configs/inference.yaml", tmp_path, "--bundle_root", ".", "--run_dir", str(run), "--input_dir",
                 str(data["multi"] / "images"), "--output_dir", str(out), "--device", "cpu", check=False)
    assert again.returncode != 0 and "exists; pass overwrite=True" in again.stderr


def test_grey_images_become_three_equal_channels(data):
    from medxfer.data.seg2d import load_seg2d
    from medxfer.transforms.seg2d import unnormalized_images

    records, labels = load_seg2d(data["multi"])
    assert records[0]["grey"]
    images = unnormalized_images(records, 32, 2)
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])


def test_transfer_needs_a_source_of_the_same_arch(pretrained, data):
    from medxfer.workflows.seg2d_transfer import seg2d_network

    bank = ModelBank.open(pretrained / "bank")
    labels = {0: "background", 1: "blob"}
    with pytest.raises(ValueError, match="unet2d encoder, the network is resnet50_attention_unet"):
        seg2d_network("resnet50_attention_unet", labels, 32, bank.names()[0], pretrained / "bank")
    with pytest.raises(ValueError, match="needs init_entry"):
        seg2d_network("unet2d", labels, 32, transfer_mode="full")
    with pytest.raises(ValueError, match="transfer_mode"):
        seg2d_network("unet2d", labels, 32, transfer_mode="frozen")


def test_metadata_is_valid():
    from medxfer.workflows.metadata import check_metadata

    assert check_metadata(BUNDLE / "configs" / "metadata.json") == []


def test_truncated_classifier_reports_auroc_and_auprc(data, tmp_path):
    from scipy.stats import mannwhitneyu

    from medxfer.networks.truncated import resnet50_encoder

    weights = tmp_path / "resnet50.pt"
    torch.save(resnet50_encoder().state_dict(), weights)  # a local "pretrained" ResNet50 (never downloaded)
    out = tmp_path / "trunc"
    _cli("configs/truncated_classifier.yaml", tmp_path, "--bundle_root", ".", "--data_root", str(data["classes"]),
         "--output_dir", str(out), "--arch", "resnet50", "--level", "2", "--weights_file", str(weights),
         "--image_size", "32", "--max_epochs", "1", "--batch_size", "8", "--val_fraction", "0.5", "--device", "cpu")
    report = json.loads((out / "classification_metrics.json").read_text())
    labels = np.array([i["label"] for i in report["images"]])
    scores = np.array([i["scores"] for i in report["images"]])
    for k, name in enumerate(sorted(p.name for p in data["classes"].iterdir() if p.is_dir())):
        pos, neg = scores[labels == k, k], scores[labels != k, k]
        u = mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))  # AUROC = P(score_pos > score_neg)
        assert report["per_class"][name]["auroc"] == pytest.approx(u, abs=1e-6)
        assert 0 < report["per_class"][name]["auprc"] <= 1
    assert report["auroc"] == pytest.approx(np.mean([c["auroc"] for c in report["per_class"].values()]))
    assert report["accuracy"] == pytest.approx(float((scores.argmax(1) == labels).mean()))


def test_truncated_resnet50_segmenter_decoder_only_from_a_weights_file(data, tmp_path):
    from medxfer.networks.truncated import resnet50_encoder

    source = resnet50_encoder().state_dict()
    weights = tmp_path / "resnet50.pt"
    torch.save(source, weights)
    out = tmp_path / "trunc_seg"
    _cli("configs/train.yaml", tmp_path, "--bundle_root", ".", "--arch", "truncated_resnet50", "--arch_kwargs",
         "{'level': 2}", "--image_size", "32", "--device", "cpu", "--data_root", str(data["binary"]),
         "--init_checkpoint", str(weights), "--transfer_mode", "decoder_only", "--output_dir", str(out),
         "--max_epochs", "1", "--batch_size", "4", "--n_folds", "3")
    trained = read_state_dict(out / "model.pt")
    kept = [k for k in trained if k.startswith("encoder.") and k.endswith("weight")]
    assert kept and all(torch.equal(trained[k], source[k[len("encoder."):]]) for k in kept)  # frozen, loaded
    assert not any(k.startswith("encoder.layer3") for k in trained)  # cut after layer2
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["mode"] == "decoder_only" and report["skipped_by_mode"]  # the levels the cut dropped
    assert all(k.startswith(("encoder.layer3", "encoder.layer4")) for k in report["skipped_by_mode"])
    _cli("configs/evaluate.yaml", tmp_path, "--bundle_root", ".", "--run_dir", str(out), "--data_root",
         str(data["binary"]), "--device", "cpu")
    assert "dice_blob" in json.loads((out / "evaluation" / "metrics.json").read_text())["summary"]


def test_resnet50_attention_unet_pretrains_and_transfers_into_full_and_truncated_networks(data, tmp_path):
    """The ResNet50 encoder pretrained by pretrain_encoder.yaml initialises the Attention U-Net and a
    truncated ResNet50 segmenter (same MONAI ResNet50 names)."""
    bank_root = tmp_path / "bank"
    _cli("configs/pretrain_encoder.yaml", tmp_path, "--bundle_root", ".", "--arch", "resnet50_attention_unet",
         "--image_size", "32", "--device", "cpu", "--data_root", str(data["classes"]), "--bank_root", str(bank_root),
         "--output_dir", str(tmp_path / "pre"), "--max_epochs", "1", "--bank_epochs", "[1]", "--batch_size", "8")
    (entry,) = ModelBank.open(bank_root).names()
    source = ModelBank.open(bank_root).load_state_dict(entry)
    for arch, extra in (("resnet50_attention_unet", []), ("truncated_resnet50", ["--arch_kwargs", "{'level': 1}"])):
        out = tmp_path / arch
        _cli("configs/train.yaml", tmp_path, "--bundle_root", ".", "--arch", arch, *extra, "--image_size", "32",
             "--device", "cpu", "--data_root", str(data["multi"]), "--bank_root", str(bank_root), "--init_entry",
             entry, "--transfer_mode", "decoder_only", "--output_dir", str(out), "--max_epochs", "1",
             "--batch_size", "4", "--n_folds", "3")
        trained = read_state_dict(out / "model.pt")
        kept = [k for k in trained if k.startswith("encoder.") and k.endswith("weight")]
        assert kept and all(torch.equal(trained[k], source[k]) for k in kept)


def test_swin_unet_trains_and_predicts_through_the_bundle(data, tmp_path):
    out = tmp_path / "swin"
    _cli("configs/train.yaml", tmp_path, "--bundle_root", ".", "--arch", "swin_unet", "--image_size", "32",
         "--device", "cpu", "--data_root", str(data["binary"]), "--transfer_mode", "scratch", "--output_dir", str(out),
         "--max_epochs", "1", "--batch_size", "4", "--n_folds", "3")
    _cli("configs/inference.yaml", tmp_path, "--bundle_root", ".", "--run_dir", str(out), "--input_dir",
         str(data["binary"] / "images"), "--output_dir", str(tmp_path / "pred"), "--device", "cpu")
    image = sorted((data["binary"] / "images").iterdir())[0]
    pred = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}.png"))
    assert pred.shape == np.asarray(Image.open(image)).shape[:2] and set(np.unique(pred)) <= {0, 255}
