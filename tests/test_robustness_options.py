"""Robustness settings of thesis chapter 4 (issue 17, item 2): the authors' colour jitter by default,
the L2 and inverse-Pearson distances, unpooled features, every image of the fine-tuning split,
the random-init encoder as an offline candidate, and the bundle's settings reaching the score."""

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from medxfer.data.seg2d import load_seg2d
from medxfer.data.splits import fold_records
from medxfer.data.synth.shapes2d import generate_seg2d
from medxfer.networks import build_network
from medxfer.transfer.bank import ModelBank
from medxfer.transferability.robustness import (
    STRONG_JITTER,
    THESIS_JITTER,
    jitter_config,
    module_robustness,
    robustness_options,
    robustness_score,
    triplet_views,
)
from medxfer.transforms.dermoscopy import IMAGENET_MEAN, IMAGENET_STD
from medxfer.transforms.jitter import JitterConfig
from medxfer.workflows.bundle import bundle_dir
from medxfer.workflows.seg2d_transfer import select_checkpoint, selection_records, target_images

NARROW = {"channels": [4, 8, 16, 32, 64], "encoder_classifier": True}


def _conv_features(seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 4, 3).double().eval()
    return lambda b: torch.relu(conv(b.double())) + 0.01


def test_the_default_colour_jitter_is_the_authors_and_strong_stays_available():
    assert (THESIS_JITTER.brightness, THESIS_JITTER.contrast, THESIS_JITTER.saturation, THESIS_JITTER.hue) == \
        (0.1, 0.05, 0.1, 0.05)
    assert (STRONG_JITTER.brightness, STRONG_JITTER.contrast, STRONG_JITTER.saturation, STRONG_JITTER.hue) == \
        (0.4, 0.4, 0.4, 0.1)
    assert jitter_config(None) == THESIS_JITTER == jitter_config("thesis")
    assert jitter_config("strong") == STRONG_JITTER
    assert jitter_config({"brightness": 0.4}) == JitterConfig(brightness=0.4, contrast=0.05, saturation=0.1, hue=0.05)
    images = torch.rand(4, 3, 8, 8)
    default = triplet_views(images, seed=2)
    thesis = triplet_views(images, seed=2, jitter=JitterConfig(brightness=0.1, contrast=0.05, saturation=0.1, hue=0.05))
    strong = triplet_views(images, seed=2, jitter="strong")
    assert all(torch.equal(a, b) for a, b in zip(default, thesis))
    assert not torch.equal(default[0], strong[0])
    # the weaker jitter moves pixels less (same uniform draws, 4-8x narrower ranges)
    assert (default[0] - images).abs().mean() < (strong[0] - images).abs().mean()
    with pytest.raises(ValueError, match="jitter preset"):
        jitter_config("medium")
    with pytest.raises(ValueError, match="unknown strength"):
        jitter_config({"brigthness": 0.1})


def test_unpooled_robustness_equals_a_direct_computation_over_spatial_positions():
    images = torch.rand(5, 3, 9, 9)
    fn = _conv_features()
    anchor, positive, negative, _ = triplet_views(images, seed=4)
    with torch.no_grad():
        fa, fp, fn_ = fn(anchor), fn(positive), fn(negative)   # (N, F, h, w)

    def cosine_over_positions(x, y):  # sum over channels and every spatial position, written out
        dot = nx = ny = 0.0
        for c in range(x.shape[0]):
            for i in range(x.shape[1]):
                for j in range(x.shape[2]):
                    dot += float(x[c, i, j] * y[c, i, j])
                    nx += float(x[c, i, j] ** 2)
                    ny += float(y[c, i, j] ** 2)
        return 1 - dot / np.sqrt(nx * ny)

    hinge = [max(0.0, cosine_over_positions(fa[k], fp[k]) - cosine_over_positions(fa[k], fn_[k]) + 0.5)
             for k in range(len(images))]
    expected = 1 - np.mean(hinge)
    for batch_size in (1, 2, 5):
        assert robustness_score(images, fn, pooled=False, seed=4, batch_size=batch_size) == \
            pytest.approx(expected, rel=1e-10)
    assert robustness_score(images, fn, pooled=True, seed=4) != pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("pooled", [True, False])
def test_l2_and_inverse_pearson_distances_match_numpy(pooled):
    images = torch.rand(6, 3, 10, 10)
    fn = _conv_features(1)
    anchor, positive, negative, _ = triplet_views(images, seed=7)
    with torch.no_grad():
        rows = [f.numpy().mean(axis=(2, 3)) if pooled else f.numpy().reshape(len(f), -1)
                for f in (fn(anchor), fn(positive), fn(negative))]
    a, p, n = rows
    l2 = lambda x, y: np.mean((x - y) ** 2, axis=1)  # noqa: E731  (the authors' l2_loss)
    pearson = lambda x, y: 1 - np.array([np.corrcoef(u, v)[0, 1] for u, v in zip(x, y)])  # noqa: E731
    for name, dist in (("l2", l2), ("inverse_pearson", pearson)):
        expected = 1 - np.mean(np.maximum(0.0, dist(a, p) - dist(a, n) + 0.25))
        got = robustness_score(images, fn, pooled=pooled, seed=7, batch_size=4, margin=0.25, distance=name)
        assert got == pytest.approx(expected, rel=1e-9), name
    with pytest.raises(ValueError, match="distance must be one of"):
        robustness_score(images, fn, distance="manhattan")


def test_pooling_follows_the_planned_transfer_mode_unless_given():
    assert robustness_options(transfer_mode="encoder_only")["pooled"] is False   # full fine-tuning: unpooled
    assert robustness_options(transfer_mode="decoder_only")["pooled"] is True    # frozen encoder: pooled
    assert robustness_options(pooled=True, transfer_mode="encoder_only")["pooled"] is True
    with pytest.raises(ValueError, match="margin"):
        robustness_options(margin=-1)


def test_bundle_robustness_settings_are_the_authors_values():
    for name in ("select_checkpoint", "online_selection"):
        config = ConfigParser.load_config_file(bundle_dir("seg2d_transfer") / "configs" / f"{name}.yaml")
        options = robustness_options(**config["robustness"], transfer_mode=config["transfer_mode"])
        assert options["jitter"] == THESIS_JITTER and options["distance"] == "cosine" and options["margin"] == 0.5
        assert options["pooled"] is False
    assert config["target_max_cases"] is None


@pytest.fixture(scope="module")
def bank_and_target(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust_opts")
    target = generate_seg2d(root / "target", num_images=22, size=(32, 32), num_classes=1, seed=3)
    bank = ModelBank.open(root / "bank", create=True)
    for epoch in (1, 2):
        torch.manual_seed(20 + epoch)
        net = build_network("unet2d", 3, 4, [32, 32], **NARROW)
        bank.add(f"unet2d_encoder_e{epoch}", net, arch="unet2d", arch_kwargs=NARROW, in_channels=3,
                 out_channels=4, patch_size=[32, 32], source=["classes"], epoch=epoch)
    return root / "bank", target


def test_selection_scores_every_training_image_of_the_fold_with_the_configured_jitter(bank_and_target, tmp_path):
    bank_root, target = bank_and_target
    records, _ = load_seg2d(target)
    train, val = fold_records(records, 0, 5, 0)
    assert len(train) > 16 and val   # more than the old silent 16-image cap; none of the validation images
    got, _ = selection_records(target, fold=0, max_cases=None)
    assert [r["id"] for r in got] == [r["id"] for r in train]
    images = target_images(target, 32, fold=0)
    assert images.shape[0] == len(train)
    for jitter in ("strong", {"brightness": 0.1, "contrast": 0.05, "saturation": 0.1, "hue": 0.05}):
        out = tmp_path / str(len(str(jitter)))
        select_checkpoint(bank_root, target, out, image_size=32, estimators=["robustness"], device="cpu",
                          max_cases=None, fold=0, robustness={"jitter": jitter, "pooled": False})
        payload = json.loads((out / "scores.json").read_text())
        assert payload["meta"]["cases"] == [r["id"] for r in train]
        bank = ModelBank.open(bank_root)
        for row in payload["rows"][1:]:
            net = build_network("unet2d", 3, 4, [32, 32], **NARROW)
            net.load_state_dict(bank.load_state_dict(row["model"]))
            direct = module_robustness(net, "encoder.levels.3", images, (IMAGENET_MEAN, IMAGENET_STD), seed=0,
                                       mode="color", pooled=False, jitter=jitter_config(jitter))
            assert row["robustness"] == pytest.approx(direct, abs=1e-9)


def test_the_random_init_encoder_is_an_offline_candidate(bank_and_target, tmp_path):
    bank_root, target = bank_and_target
    selection = select_checkpoint(bank_root, target, tmp_path / "sel", image_size=32, estimators=["robustness", "gbc"],
                                  device="cpu", seed=5)
    rows = json.loads((tmp_path / "sel" / "scores.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["unet2d_random_init", "unet2d_encoder_e1", "unet2d_encoder_e2"]
    assert rows[0]["epoch"] == 0 and np.isfinite(rows[0]["gbc"])
    torch.manual_seed(5)
    net = build_network("unet2d", 3, 4, [32, 32], **NARROW)
    direct = module_robustness(net, "encoder.levels.3", target_images(target, 32, fold=0),
                               (IMAGENET_MEAN, IMAGENET_STD), seed=5, mode="color", pooled=False)
    assert rows[0]["robustness"] == pytest.approx(direct, abs=1e-9)
    assert selection["model"] == max(rows, key=lambda r: r["robustness"])["model"]   # start_epoch 0: eligible
    # a rerun reads everything back (resumable) and gives the same rows
    again = select_checkpoint(bank_root, target, tmp_path / "sel", image_size=32, estimators=["robustness", "gbc"],
                              device="cpu", seed=5)
    assert again == selection
    only_pretrained = select_checkpoint(bank_root, target, tmp_path / "sel1", image_size=32,
                                        estimators=["robustness"], device="cpu", seed=5, start_epoch=1)
    assert only_pretrained["epoch"] >= 1
