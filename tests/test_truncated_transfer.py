"""Truncated transfer learning (SPEC section 8) and the AUROC / AUPRC metrics (SPEC section 9)."""

import math
import re

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from medxfer.metrics.classification import auprc, auroc, classification_report
from medxfer.networks.truncated import (TruncatedClassifier, TruncatedSegmenter, densenet121_encoder,
                                        parameter_count, resnet50_encoder, truncate_encoder, truncation_levels)
from medxfer.transfer.weights import truncated_encoder_weights

LEVELS = (1, 2, 3, 4)
# Written out by hand (not taken from the module): output channels and stride of each level.
EXPECTED = {
    "resnet50": {1: (256, 4), 2: (512, 8), 3: (1024, 16), 4: (2048, 32)},
    "densenet121": {1: (128, 8), 2: (256, 16), 3: (512, 32), 4: (1024, 32)},
}
_RES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
_DENSE = tuple("features." + m + "." for m in ("conv0", "norm0", "denseblock1", "transition1", "denseblock2",
                                               "transition2", "denseblock3", "transition3", "denseblock4", "norm5"))
# Prefixes of the parameter/buffer keys kept by each level (modules without tensors omitted).
KEPT = {
    "resnet50": {1: _RES[:3], 2: _RES[:4], 3: _RES[:5], 4: _RES},
    "densenet121": {1: _DENSE[:4], 2: _DENSE[:6], 3: _DENSE[:8], 4: _DENSE},
}
# torchvision's resnet50 / densenet121 parameter counts (25,557,032 / 7,978,856) minus their
# 1000-class fc (2048*1000+1000 / 1024*1000+1000).
TORCHVISION_ENCODER_PARAMS = {"resnet50": 23_508_032, "densenet121": 6_953_856}
ARCH_LEVELS = [(a, k) for a in EXPECTED for k in LEVELS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small CPU models: one thread avoids oversubscribing a busy machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _encoder(arch, seed=0):
    torch.manual_seed(seed)
    return resnet50_encoder() if arch == "resnet50" else densenet121_encoder()


def _shifted_state(arch, seed=1):
    """A full-encoder state dict no fresh network matches by chance (float tensors shifted by 1)."""
    return {k: (v + 1.0 if v.is_floating_point() else v.clone()) for k, v in _encoder(arch, seed).state_dict().items()}


def _pretrained_like(arch, seed=1):
    """Another initialisation with trained-looking BatchNorm affine parameters (gamma ~ 1 +- 0.2,
    beta ~ 0 +- 0.2). With the fresh gamma = 1, beta = 0 of every BN, DenseNet121's output is
    exactly invariant to the scale of ``norm0`` (every later consumer re-normalises it per channel,
    and ReLU / max-pool commute with positive scales), so that gradient is rounding noise."""
    enc = _encoder(arch, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.add_(0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.add_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return enc.state_dict()


# --- (a) shapes -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,level", ARCH_LEVELS)
def test_every_level_gives_documented_channels_strides_and_output_shapes(arch, level):
    channels, stride = EXPECTED[arch][level]
    info = {lv.level: lv for lv in truncation_levels(arch)}[level]
    assert (info.channels, info.stride) == (channels, stride)
    x = torch.randn(2, 3, 64, 64)

    enc = truncate_encoder(_encoder(arch), arch, level).eval()
    with torch.no_grad():
        feat = enc(x)
        skips = enc.forward_features(x)
    assert tuple(feat.shape) == (2, channels, 64 // stride, 64 // stride)
    assert (enc.channels, enc.stride) == (channels, stride)
    assert torch.equal(skips[-1], feat)
    assert [tuple(f.shape[1:]) for f in skips] == [(c, 64 // s, 64 // s) for c, s in
                                                   zip(enc.feature_channels, enc.feature_strides)]
    assert enc.feature_strides[0] == 2 and all(b == 2 * a for a, b in zip(enc.feature_strides, enc.feature_strides[1:]))

    clf = TruncatedClassifier(arch, level, num_classes=3, image_size=64).eval()
    seg = TruncatedSegmenter(arch, level, out_channels=2).eval()
    with torch.no_grad():
        assert tuple(clf(x).shape) == (2, 3)
        with pytest.raises(ValueError, match="built for 64x64 inputs, got 96x96"):
            clf(torch.randn(1, 3, 96, 96))
        assert tuple(seg(x).shape) == (2, 2, 64, 64)
        if level == 4:  # sides that are not multiples of 32: padded inside, cropped back
            assert tuple(seg(torch.randn(1, 3, 50, 70)).shape) == (1, 2, 50, 70)
    # flatten head (the authors' default): every position of the C_k x 64/s x 64/s map; pooling: C_k
    assert clf.head.in_features == channels * (64 // stride) ** 2
    if level in (1, 4):
        gap = TruncatedClassifier(arch, level, num_classes=3, head="gap").eval()
        assert gap.head.in_features == channels
        with torch.no_grad():
            assert tuple(gap(x).shape) == (2, 3) and tuple(gap(torch.randn(1, 3, 96, 96)).shape) == (1, 3)


def test_grayscale_input_and_invalid_arguments():
    clf = TruncatedClassifier("densenet121", 1, num_classes=1, in_channels=1, image_size=32).eval()
    with torch.no_grad():
        assert tuple(clf(torch.randn(1, 1, 32, 32)).shape) == (1, 1)
    with pytest.raises(ValueError, match="level"):
        TruncatedClassifier("resnet50", 5, 2)
    with pytest.raises(ValueError, match="vgg16"):
        TruncatedSegmenter("vgg16", 1, 2)
    from monai.networks.nets import resnet50
    with pytest.raises(ValueError, match="conv1_t_stride=2"):  # MONAI's default stride-1 stem
        truncate_encoder(resnet50(spatial_dims=2, feed_forward=False), "resnet50", 2)
    with pytest.raises(ValueError, match="features"):
        truncate_encoder(resnet50_encoder(), "densenet121", 2)


# --- (b) sharing and loading ------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(EXPECTED))
def test_truncation_shares_parameters_with_the_source(arch):
    full = _encoder(arch)
    enc = truncate_encoder(full, arch, 2).eval()
    full_params = dict(full.named_parameters())
    for name, p in enc.named_parameters():
        assert p is full_params[name] and p.data_ptr() == full_params[name].data_ptr(), name
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = enc(x)
        first_conv = full.conv1 if arch == "resnet50" else full.features.conv0
        first_conv.weight.mul_(-1.5)
        assert not torch.allclose(enc(x), before)


@pytest.mark.parametrize("arch,level", [("resnet50", 1), ("resnet50", 3), ("densenet121", 1), ("densenet121", 3)])
def test_full_state_loads_exactly_the_kept_keys(arch, level, tmp_path):
    state = _shifted_state(arch)
    kept = sorted(k for k in state if k.startswith(KEPT[arch][level]))
    dropped = sorted(set(state) - set(kept))
    assert kept and dropped

    # plain nn.Module semantics: only the deeper layers are unexpected
    enc = truncate_encoder(_encoder(arch), arch, level)
    result = enc.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == dropped

    # through a file, with wrapper prefixes, into a classifier
    path = tmp_path / "encoder.pt"
    torch.save({"module.encoder." + k: v for k, v in state.items()}, path)
    clf = TruncatedClassifier(arch, level, num_classes=2)
    report = truncated_encoder_weights(clf, str(path))
    assert report.loaded == sorted("encoder." + k for k in kept) and len(report.loaded) == len(kept)
    assert sorted(report.skipped_by_mode) == sorted("encoder." + k for k in dropped)  # cut off by the truncation
    assert report.initialised == ["head.bias", "head.weight"]  # only the new head keeps its random init
    assert report.shape_mismatch == {} and report.not_in_network == []
    own = clf.state_dict()
    for key in kept:
        assert torch.equal(own["encoder." + key], state[key]), key
    assert all(p.requires_grad for p in clf.parameters())


def test_torchvision_densenet_keys_and_shape_mismatch_are_handled():
    state = _shifted_state("densenet121")
    # torchvision's key style: denselayerN.norm1 / .norm.1 instead of MONAI's denselayerN.layers.norm1
    tv = {k.replace(".layers.norm1", ".norm1").replace(".layers.conv2", ".conv.2").replace(".layers.", "."): v
          for k, v in state.items()}
    assert not any(".layers." in k for k in tv)
    report = truncated_encoder_weights(TruncatedClassifier("densenet121", 1, num_classes=2), tv)
    assert len(report.loaded) == sum(k.startswith(KEPT["densenet121"][1]) for k in state)

    gray = TruncatedClassifier("resnet50", 1, num_classes=2, in_channels=1)
    # an RGB encoder on grey-scale images: the stem cannot load, an error unless a partial transfer is allowed
    with pytest.raises(ValueError, match=r"encoder\.conv1\.weight \(64,3,7,7\) vs \(64,1,7,7\)"):
        truncated_encoder_weights(gray, _shifted_state("resnet50"))
    report = truncated_encoder_weights(gray, _shifted_state("resnet50"), allow_partial=True)
    assert list(report.shape_mismatch) == ["encoder.conv1.weight"] and report.missing == ["encoder.conv1.weight"]


# --- (c) parameter counts ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(EXPECTED))
def test_parameter_count_decreases_strictly_with_smaller_level(arch):
    enc = [parameter_count(truncate_encoder(_encoder(arch), arch, k)) for k in LEVELS]
    clf = [parameter_count(TruncatedClassifier(arch, k, num_classes=2, head="gap")) for k in LEVELS]
    seg = [parameter_count(TruncatedSegmenter(arch, k, out_channels=1)) for k in LEVELS]
    for counts in (enc, clf, seg):
        assert all(a < b for a, b in zip(counts, counts[1:])), counts
    assert enc[-1] == TORCHVISION_ENCODER_PARAMS[arch] == parameter_count(_encoder(arch))
    head = EXPECTED[arch][1][0] * 2 + 2
    assert clf[0] == enc[0] + head
    # flatten head at 224 x 224 (the paper's input): C_k * (224 / s_k)^2 inputs per class, + bias
    channels, stride = EXPECTED[arch][1]
    flat = TruncatedClassifier(arch, 1, num_classes=2)
    assert parameter_count(flat) == enc[0] + channels * (224 // stride) ** 2 * 2 + 2


# --- (d) every kept layer is fine-tuned -------------------------------------------------------

@pytest.mark.parametrize("arch,level", ARCH_LEVELS)
def test_one_sgd_step_changes_every_kept_encoder_tensor(arch, level):
    torch.manual_seed(0)
    clf = TruncatedClassifier(arch, level, num_classes=3, image_size=64)
    truncated_encoder_weights(clf, _pretrained_like(arch))
    clf.train()
    before = {k: p.detach().clone() for k, p in clf.encoder.named_parameters()}
    assert before and all(p.requires_grad for p in clf.parameters())
    opt = torch.optim.SGD(clf.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(clf(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    unchanged = [k for k, p in clf.encoder.named_parameters() if torch.equal(p.detach(), before[k])]
    assert unchanged == []
    kept_modules = {k.split(".")[0] if arch == "resnet50" else ".".join(k.split(".")[:2]) for k in before}
    assert kept_modules == {p.rstrip(".") for p in KEPT[arch][level]}


# --- (e) AUROC / AUPRC ------------------------------------------------------------------------

def _brute_force_ap(y, s):
    """Average precision by a loop over distinct thresholds, highest first: sum (R_n - R_{n-1}) P_n."""
    y, s = np.asarray(y, dtype=float), np.asarray(s, dtype=float)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        predicted = s >= t
        tp = float((y[predicted] == 1).sum())
        precision, recall = tp / predicted.sum(), tp / y.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def test_auroc_is_the_mann_whitney_u_statistic_with_ties():
    rng = np.random.default_rng(0)
    for n in (7, 50, 301):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.integers(0, 6, n).astype(float)  # many ties
        pos, neg = s[y == 1], s[y == 0]
        u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
        assert auroc(y, s) == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)


def test_auprc_matches_brute_force_and_closed_forms():
    rng = np.random.default_rng(1)
    for n in (9, 80, 257):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.normal(size=n), 1)  # ties
        assert auprc(y, s) == pytest.approx(_brute_force_ap(y, s), abs=1e-12)
    # perfect ranking
    assert auprc([0, 0, 1, 1, 0, 1], [0.1, 0.2, 0.9, 0.8, 0.3, 0.7]) == pytest.approx(1.0)
    assert auroc([0, 0, 1, 1, 0, 1], [0.1, 0.2, 0.9, 0.8, 0.3, 0.7]) == pytest.approx(1.0)
    # by hand: thresholds 0.9 (P 1, R 1/2), 0.8 (P 1/2, R 1/2), 0.7 (P 2/3, R 1): 1/2 + 0 + 1/3
    assert auprc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6)
    assert auroc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(3 / 4)
    # a tie between a positive and a negative is one threshold: 0.5 (P 1/2, R 1/2), 0.2 (P 2/3, R 1)
    assert auprc([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(1 / 4 + 1 / 3)
    assert auroc([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(1 / 4)


def test_multiclass_multilabel_single_class_columns_and_report():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 40)
    scores = rng.normal(size=(40, 3))
    roc, pr = auroc(labels, scores), auprc(labels, scores)
    for c in range(3):
        assert roc["per_class"][c] == pytest.approx(auroc((labels == c).astype(int), scores[:, c]))
        assert pr["per_class"][c] == pytest.approx(_brute_force_ap(labels == c, scores[:, c]))
    assert roc["macro"] == pytest.approx(np.mean(roc["per_class"]))

    multilabel = np.stack([(labels == 0), np.ones(40), rng.integers(0, 2, 40)], axis=1).astype(int)
    roc = auroc(multilabel, scores)
    assert math.isnan(roc["per_class"][1]) and not math.isnan(roc["per_class"][0])
    assert roc["macro"] == pytest.approx((roc["per_class"][0] + roc["per_class"][2]) / 2)
    assert math.isnan(auprc(np.zeros(5), np.arange(5.0)))
    assert math.isnan(auroc(np.ones(5), np.arange(5.0)))

    rep = classification_report(multilabel, scores, class_names=["a", "b", "c"])
    assert rep["n"] == 40 and rep["per_class"]["b"]["prevalence"] == 1.0 and math.isnan(rep["per_class"]["b"]["auprc"])
    assert rep["prevalence"] == pytest.approx(multilabel.mean())
    binary = classification_report([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert binary == {"auroc": pytest.approx(0.75), "auprc": pytest.approx(5 / 6), "prevalence": 0.5, "n": 4,
                      "n_positive": 2, "auprc_method": "average_precision"}
    with pytest.raises(ValueError, match="0/1"):
        auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        auprc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        auroc(np.zeros((4, 2)), np.zeros((4, 3)))


# --- (f) bad weights files --------------------------------------------------------------------

def test_bad_weights_files_raise_errors_naming_the_file(tmp_path):
    pickled = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=re.escape(str(pickled))):
        truncated_encoder_weights(TruncatedClassifier("resnet50", 1, num_classes=2), pickled)
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        truncated_encoder_weights(TruncatedSegmenter("densenet121", 1, out_channels=1), missing)
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(ValueError, match=re.escape(str(a_list))):
        truncated_encoder_weights(TruncatedClassifier("densenet121", 1, num_classes=2), a_list)
    unrelated = tmp_path / "unrelated.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), unrelated)
    with pytest.raises(ValueError, match=re.escape(str(unrelated)) + ".*no tensor matches"):
        truncated_encoder_weights(TruncatedClassifier("resnet50", 2, num_classes=2), unrelated)


# --- (g) multi-label (CheXpert-style) loss and metrics, trapezoidal AUPRC -----------------------

def _pr_points(y, s):
    """(recall, precision) at every distinct threshold, highest first, with (0, 1) in front."""
    y, s = np.asarray(y, dtype=float), np.asarray(s, dtype=float)
    recall, precision = [0.0], [1.0]
    for t in sorted(set(s.tolist()), reverse=True):
        predicted = s >= t
        tp = float((y[predicted] == 1).sum())
        recall.append(tp / y.sum())
        precision.append(tp / predicted.sum())
    return np.array(recall), np.array(precision)


def test_trapezoid_auprc_and_the_monai_cumulative_metric():
    from scipy.integrate import trapezoid

    from medxfer.metrics.classification import RankingMetric

    # by hand: points (0, 1), (1/2, 1), (1/2, 1/2), (1, 2/3): 1/2 + 0 + 1/2 * (1/2 + 2/3) / 2
    assert auprc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], method="trapezoid") == pytest.approx(19 / 24)
    rng = np.random.default_rng(3)
    for n in (9, 80, 257):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.normal(size=n), 1)  # ties
        r, p = _pr_points(y, s)
        assert auprc(y, s, method="trapezoid") == pytest.approx(trapezoid(p, r), abs=1e-12)
    with pytest.raises(ValueError, match="AUPRC method"):
        auprc([0, 1], [0.1, 0.2], method="interpolated")

    labels = rng.integers(0, 2, (30, 4))
    labels[:2] = [[0, 0, 0, 0], [1, 1, 1, 1]]
    scores = rng.normal(size=(30, 4))
    metric = RankingMetric("auprc", "trapezoid")
    metric(torch.as_tensor(scores[:10]), torch.as_tensor(labels[:10]))                  # a batch
    metric([torch.as_tensor(v) for v in scores[10:]], [torch.as_tensor(v) for v in labels[10:]])  # decollated
    expected = np.mean([trapezoid(*_pr_points(labels[:, c], scores[:, c])[::-1]) for c in range(4)])
    assert metric.aggregate() == pytest.approx(expected, abs=1e-12)
    rep = classification_report(labels, scores, auprc_method="trapezoid")
    assert rep["auprc"] == pytest.approx(expected) and rep["auprc_method"] == "trapezoid"


def test_multilabel_and_weighted_losses_match_closed_forms():
    from scipy.special import log_expit, log_softmax

    from medxfer.workflows.truncated_classification import class_weights, classification_loss

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (12, 3)).astype(float)
    y[0], y[1] = 1, 0
    x = rng.normal(size=(12, 3)) * 3
    records = [{"label": row.tolist()} for row in y]
    w = class_weights(records, 3, "multilabel")
    counts = y.sum(0)
    np.testing.assert_allclose(w.numpy(), counts.max() / counts, rtol=1e-6)
    # BCE with pos_weight: -mean(w_c y log s(x) + (1 - y) log(1 - s(x)))
    closed = -np.mean(w.numpy() * y * log_expit(x) + (1 - y) * log_expit(-x))
    loss = classification_loss("multilabel", w)(torch.as_tensor(x, dtype=torch.float32),
                                                torch.as_tensor(y, dtype=torch.float32))
    assert float(loss) == pytest.approx(closed, rel=1e-5)
    assert float(classification_loss("multilabel")(torch.as_tensor(x), torch.as_tensor(y))) == pytest.approx(
        -np.mean(y * log_expit(x) + (1 - y) * log_expit(-x)), rel=1e-9)

    k = np.array([0, 1, 1, 2, 2, 2, 0, 2])
    logits = rng.normal(size=(8, 3))
    wk = class_weights([{"label": int(v)} for v in k], 3, "multiclass")
    np.testing.assert_allclose(wk.numpy(), [4 / 2, 4 / 2, 4 / 4])
    ce = -np.sum(wk.numpy()[k] * log_softmax(logits, 1)[np.arange(8), k]) / np.sum(wk.numpy()[k])
    assert float(classification_loss("multiclass", wk.double())(torch.as_tensor(logits), torch.as_tensor(k))) == \
        pytest.approx(ce, rel=1e-9)
    with pytest.raises(ValueError, match=r"classes \[1\] have no training images"):
        class_weights([{"label": 0}, {"label": 2}], 3, "multiclass")


def test_chexpert_csv_and_a_multilabel_run(tmp_path):
    import csv

    from medxfer.data.synth.shapes2d import generate_classification_folder
    from medxfer.workflows.truncated_classification import multilabel_datalists, run_protocol

    root = generate_classification_folder(tmp_path / "imgs", num_classes=3, images_per_class=8, size=32, seed=5)
    files = sorted(p.relative_to(tmp_path) for p in root.rglob("*.png"))
    findings = ["Edema", "Cardiomegaly"]
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    # per class folder: positive / uncertain / blank; uncertain -> 1 (U-Ones), blank -> 0
    cells = dict(zip(names, [("1.0", "0.0"), ("-1.0", "1.0"), ("", "0.0")]))
    expected = dict(zip(names, [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path", "Sex", *findings])
        for p in files:
            w.writerow([p.as_posix(), "F", *cells[p.parts[1]]])
    lists = multilabel_datalists(tmp_path / "train.csv", classes=findings, val_fraction=0.25, test_fraction=0.25)
    everything = lists["train"] + lists["val"] + lists["test"]
    assert len(everything) == len(files) and lists["classes"] == findings
    assert all(r["label"] == expected[r["id"].split("/")[1]] for r in everything)
    zeros = multilabel_datalists(tmp_path / "train.csv", classes=findings, uncertain="zeros", val_fraction=0.25,
                                 test_fraction=0.25)
    assert [1.0, 1.0] not in [r["label"] for r in zeros["train"] + zeros["val"] + zeros["test"]]
    bad = tmp_path / "bad.csv"
    bad.write_text("Path,Edema\nimgs/x.png,2\n")
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r" line 2 column 'Edema': label '2'"):
        multilabel_datalists(bad)

    out = run_protocol("densenet121", "Dens-T1", lists, tmp_path / "run", task="multilabel", image_size=32,
                       repeats=1, max_epochs=1, batch_size=8, learning_rate=1e-4)
    labels = np.array([i["label"] for i in out["images"]])
    scores = np.array([i["scores"] for i in out["images"]])
    assert labels.shape == scores.shape == (len(lists["test"]), 2) and ((scores > 0) & (scores < 1)).all()  # sigmoid
    for c, name in enumerate(findings):
        if 0 < labels[:, c].sum() < len(labels):
            r, p = _pr_points(labels[:, c], scores[:, c])
            assert out["per_class"][name]["auprc"] == pytest.approx(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2))
    assert out["accuracy"] == pytest.approx(((scores > 0.5) == labels).mean())
    assert out["task"] == "multilabel" and out["repeats"][0]["tested"] in ("best.pt", "model.pt")
