"""The truncated-transfer paper's cuts and protocol (issue 17, item 5): Res-T1..T5 keep exactly
25 / 37 / 43 / 46 / 49 main-path convs, load through the one weight path, and the paper preset
(Adam 1e-5, lr halved on a validation-AUPRC plateau, best-validation network on a test set,
repeats) runs end to end on generated data."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from bundle_cli import bundle_cli
from medxfer.data.synth.shapes2d import generate_classification_folder
from medxfer.networks.registry import build_network
from medxfer.networks.truncated import (PAPER_CUTS, TruncatedClassifier, parameter_count, resnet50_encoder,
                                        truncate_encoder, truncated_layout, truncation_cuts)
from medxfer.transfer.weights import truncated_encoder_weights
from medxfer.workflows.bundle import bundle_dir
from medxfer.workflows.truncated_classification import evaluate_classifier, folder_datalists, run_protocol

# Written out from the paper (section 2): conv layers kept by Res-T1..T5.
PAPER_CONVS = {"Res-T1": 25, "Res-T2": 37, "Res-T3": 43, "Res-T4": 46, "Res-T5": 49}
# By hand: the last kept bottleneck, output channels and stride of each cut.
LAST_BLOCK = {"Res-T1": ("layer3", 0, 1024, 16), "Res-T2": ("layer3", 4, 1024, 16), "Res-T3": ("layer4", 0, 2048, 32),
              "Res-T4": ("layer4", 1, 2048, 32), "Res-T5": ("layer4", 2, 2048, 32)}
STAGE_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return resnet50_encoder().eval()


def _main_path_convs(module: torch.nn.Module) -> list[str]:
    """Every Conv2d of ``module`` except the 1x1 shortcut projections (``downsample``)."""
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d) and ".downsample" not in n]


@pytest.mark.parametrize("name", list(PAPER_CONVS))
def test_paper_cut_keeps_exactly_the_papers_main_path_convs(source, name):
    enc = truncate_encoder(source, "resnet50", name)
    convs = _main_path_convs(enc)
    assert len(convs) == PAPER_CONVS[name]
    stage, last, channels, stride = LAST_BLOCK[name]
    blocks = [n for n, m in enc.named_modules() if type(m).__name__ == "ResNetBottleneck"]
    assert blocks[-1] == f"{stage}.{last}" and len(convs) == 1 + 3 * len(blocks)
    info = {c.name: c for c in truncation_cuts("resnet50")}[name]
    assert (info.conv_layers, info.channels, info.stride, info.last_module) == (PAPER_CONVS[name], channels, stride, stage)

    # the same computation as running the source's modules by hand up to that block
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = source.maxpool(source.act(source.bn1(source.conv1(x))))
        for s in ("layer1", "layer2", "layer3", "layer4"):
            n = last + 1 if s == stage else STAGE_BLOCKS[s]
            for block in list(getattr(source, s).children())[:n]:
                y = block(y)
            if s == stage:
                break
        out = enc(x)
    assert tuple(out.shape) == (1, channels, 64 // stride, 64 // stride)
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    for n, p in enc.named_parameters():  # the source's own tensors under the source's names
        assert p is source.get_parameter(n)


def test_cut_names_are_forgiving_and_wrong_ones_are_named(source):
    for spelling in ("Res-T2", "res_t2", "RES-T2", "rest2"):
        assert truncate_encoder(source, "resnet50", spelling).level == "Res-T2"
    with pytest.raises(ValueError, match=r"resnet50: truncation level .*'Res-T1'.*got 'Res-T6'"):
        TruncatedClassifier("resnet50", "Res-T6", 2)
    with pytest.raises(ValueError, match="densenet121.*Dens-T1"):
        TruncatedClassifier("densenet121", "Res-T1", 2)
    dens = {c.name: c for c in truncation_cuts("densenet121")}
    assert {n: dens[n].level for n in PAPER_CUTS["densenet121"]} == {n: n for n in PAPER_CUTS["densenet121"]}
    assert [dens[n].conv_layers for n in ("Dens-T1", "Dens-T2", "Dens-T3", "Dens-F")] == [14, 39, 88, 120]


def test_full_encoder_state_loads_the_kept_blocks_and_skips_the_dropped_ones(source):
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    clf = TruncatedClassifier("resnet50", "Res-T1", num_classes=3, image_size=64)
    report = truncated_encoder_weights(clf, state)
    kept = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.0.")
    assert report.loaded == sorted("encoder." + k for k in state if k.startswith(kept))
    assert sorted(report.skipped_by_mode) == sorted("encoder." + k for k in state if not k.startswith(kept))
    assert report.initialised == ["head.bias", "head.weight"] and report.missing == []
    assert truncated_layout(clf).cut_off == [f"encoder.layer3.{i}" for i in range(1, 6)] + ["encoder.layer4"]
    own = clf.state_dict()
    assert all(torch.equal(own["encoder." + k], state[k]) for k in state if k.startswith(kept))
    # the flatten head: 1024 x (64/16)^2 inputs; 224 x 224 (the paper's size): 1024 x 14 x 14
    assert clf.head.in_features == 1024 * 4 * 4
    assert TruncatedClassifier("resnet50", "Res-T1", 1).head.in_features == 1024 * 14 * 14
    assert parameter_count(clf.encoder) == sum(p.numel() for n, p in source.named_parameters() if n.startswith(kept))


def test_registered_segmenter_builds_a_paper_cut():
    seg = build_network("truncated_resnet50", 3, 1, [32, 32], level="Res-T3").eval()
    assert len(_main_path_convs(seg.encoder)) == 43
    with torch.no_grad():
        assert tuple(seg(torch.randn(1, 3, 40, 36)).shape) == (1, 1, 40, 36)


# --- the protocol ----------------------------------------------------------------------------------

def _plateau_lrs(scores, lr, factor, patience, threshold=1e-4):
    """ReduceLROnPlateau(mode="max", threshold_mode="rel") written out: the lr after each step."""
    best, bad, out = -np.inf, 0, []
    for s in scores:
        if s > best * (1 + threshold):
            best, bad = s, 0
        else:
            bad += 1
        if bad > patience:
            lr, bad = lr * factor, 0
        out.append(lr)
    return out


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("trunc_cls")
    return generate_classification_folder(root / "classes", num_classes=3, images_per_class=10, size=32, seed=3)


def test_protocol_halves_lr_on_val_auprc_plateau_and_tests_the_best_network(classes, tmp_path):
    lists = folder_datalists(classes, val_fraction=0.3, test_fraction=0.3, seed=0)
    ids = [{r["id"] for r in lists[s]} for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]) and sum(map(len, ids)) == 30
    assert all(sorted({r["label"] for r in lists[s]}) == [0, 1, 2] for s in ("val", "test"))  # stratified

    out = run_protocol("resnet50", "Res-T1", lists, tmp_path, image_size=32, repeats=2, max_epochs=4, batch_size=8,
                       learning_rate=1e-3, plateau_patience=0, auprc_method="trapezoid")
    assert len(out["repeats"]) == 2
    assert any(h["lr"] < 1e-3 for run in out["repeats"] for h in run["history"])  # a plateau really halved it
    for run in out["repeats"]:
        scores = [h["val_auprc"] for h in run["history"]]
        assert [h["epoch"] for h in run["history"]] == [1, 2, 3, 4]
        assert [h["lr"] for h in run["history"]] == pytest.approx(_plateau_lrs(scores, 1e-3, 0.5, 0))
        assert run["best_epoch"] == 1 + int(np.argmax(scores)) and run["tested"] == "best.pt"
        # the test scores are those of best.pt (re-evaluated from the file), not of the last epoch
        net = TruncatedClassifier("resnet50", "Res-T1", 3, image_size=32)
        net.load_state_dict(torch.load(f"{run['dir']}/best.pt", weights_only=True))
        again = evaluate_classifier(net, lists["test"], lists["classes"], 32, tmp_path / "again",
                                    auprc_method="trapezoid")
        saved = json.loads((tmp_path / f"repeat_{run['repeat']}" / "classification_metrics.json").read_text())
        np.testing.assert_allclose([i["scores"] for i in again["images"]], [i["scores"] for i in saved["images"]],
                                   atol=1e-5)
        assert saved["auprc"] == pytest.approx(run["auprc"]) and saved["auprc_method"] == "trapezoid"
    reps = [json.loads((tmp_path / f"repeat_{r}" / "classification_metrics.json").read_text()) for r in (0, 1)]
    for key in ("auroc", "auprc", "accuracy"):
        assert out[key] == pytest.approx(np.mean([r[key] for r in reps]))
        assert out[key + "_std"] == pytest.approx(np.std([r[key] for r in reps]))
    assert json.loads((tmp_path / "classification_metrics.json").read_text())["auprc"] == pytest.approx(out["auprc"])


def test_paper_preset_runs_with_overrides(classes, tmp_path):
    bundle = bundle_dir("seg2d_transfer")
    configs = "['configs/truncated_classifier.yaml','configs/truncated_paper.yaml']"
    out = tmp_path / "paper"
    bundle_cli(bundle, ["--config_file", configs, "--bundle_root", ".", "--data_root", str(classes),
                        "--output_dir", str(out), "--image_size", "32", "--max_epochs", "1", "--batch_size", "8",
                        "--val_fraction", "0.3", "--test_fraction", "0.3", "--device", "cpu"], tmp_path)
    report = json.loads((out / "classification_metrics.json").read_text())
    s = report["settings"]
    assert (s["optimizer"], s["learning_rate"], s["plateau_metric"], s["plateau_factor"], s["head"], s["level"]) == \
        ("adam", 1e-5, "auprc", 0.5, "flatten", "Res-T1")
    assert len(report["repeats"]) == 3 and [r["seed"] for r in report["repeats"]] == [0, 1, 2]
    names = sorted(p.name for p in classes.iterdir() if p.is_dir())
    for r in range(3):
        rep = json.loads((out / f"repeat_{r}" / "classification_metrics.json").read_text())
        labels = np.array([i["label"] for i in rep["images"]])
        scores = np.array([i["scores"] for i in rep["images"]])
        for k, name in enumerate(names):  # AUROC = Mann-Whitney U / (n_pos n_neg) on the test images
            u = mannwhitneyu(scores[labels == k, k], scores[labels != k, k]).statistic
            assert rep["per_class"][name]["auroc"] == pytest.approx(u / ((labels == k).sum() * (labels != k).sum()))
        assert (out / f"repeat_{r}" / "best.pt").is_file() and (out / f"repeat_{r}" / "model.pt").is_file()
    assert report["n_test"] == len(labels) == 9
