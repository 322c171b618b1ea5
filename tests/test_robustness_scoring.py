"""Robustness settings in the one scoring loop (issue 17, item 2): :attr:`ScoringTarget.robustness`
reaches the robustness computation of :func:`score_target`, belongs to the per-model cache key and
to :func:`score_into`'s key only when it is not the default (so keys and caches of the default 3D
settings stay what they were), and robustness alone samples no voxel features. The expected values
are direct :func:`module_robustness` calls on the same weights and images."""

import json
from dataclasses import replace

import pytest
import torch

import medxfer.transferability.score as score
from medxfer.data.seg2d import load_seg2d
from medxfer.data.synth.shapes2d import generate_seg2d
from medxfer.networks import build_network
from medxfer.transfer.bank import ModelBank
from medxfer.transferability.features import SamplingConfig
from medxfer.transferability.robustness import STRONG_JITTER, module_robustness
from medxfer.transferability.score import (
    DEFAULT_ROBUSTNESS,
    STATE_FILE,
    score_into,
    score_target,
    seg2d_key,
    seg2d_target,
    target_digest,
)
from medxfer.transforms.dermoscopy import IMAGENET_MEAN, IMAGENET_STD
from medxfer.transforms.seg2d import unnormalized_images

NARROW = {"channels": [4, 8, 16, 32, 64], "encoder_classifier": True}
THESIS_L2 = {"jitter": "strong", "pooled": False, "distance": "l2", "margin": 0.25}


@pytest.fixture(scope="module")
def bank_and_target(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust_scoring")
    target = generate_seg2d(root / "target", num_images=5, size=(32, 32), num_classes=1, seed=4)
    bank = ModelBank.open(root / "bank", create=True)
    for epoch in (1, 2):
        torch.manual_seed(30 + epoch)
        net = build_network("unet2d", 3, 4, [32, 32], **NARROW)
        bank.add(f"unet2d_e{epoch}", net, arch="unet2d", arch_kwargs=NARROW, in_channels=3, out_channels=4,
                 patch_size=[32, 32], source=["classes"], epoch=epoch)
    return root / "bank", target


def _direct(bank_root, name, target_root, **options):
    net = build_network("unet2d", 3, 4, [32, 32], **NARROW)
    net.load_state_dict(ModelBank.open(bank_root).load_state_dict(name))
    images = unnormalized_images(load_seg2d(target_root)[0], [32, 32])
    return module_robustness(net, "encoder.levels.3", images, (IMAGENET_MEAN, IMAGENET_STD), seed=3, mode="color",
                             **options)


def test_score_target_scores_robustness_with_the_targets_settings(bank_and_target):
    bank_root, target_root = bank_and_target
    rows = score_target(bank_root, seg2d_target(target_root, 32, None, robustness=THESIS_L2), ["robustness", "gbc"],
                        SamplingConfig(seed=3), device="cpu", progress=False, seed=3)
    default = score_target(bank_root, seg2d_target(target_root, 32, None), ["robustness"], device="cpu",
                           progress=False, seed=3)
    for row, plain in zip(rows, default):
        assert row["robustness"] == pytest.approx(
            _direct(bank_root, row["model"], target_root, pooled=False, distance="l2", margin=0.25,
                    jitter=STRONG_JITTER), abs=1e-9)
        assert plain["robustness"] == pytest.approx(_direct(bank_root, row["model"], target_root, pooled=True),
                                                    abs=1e-9)
        assert row["robustness"] != pytest.approx(plain["robustness"], abs=1e-6)


def test_only_settings_other_than_the_default_change_the_keys(bank_and_target, tmp_path):
    bank_root, target_root = bank_and_target
    target = seg2d_target(target_root, 32, None)
    same = {target_digest(replace(target, robustness=r)) for r in (None, DEFAULT_ROBUSTNESS, {"pooled": True})}
    assert same == {target_digest(target)}   # default settings: the digest of a target without settings
    assert target_digest(replace(target, robustness={"pooled": False})) != target_digest(target)

    key = seg2d_key(target_root, 32, None)
    out = tmp_path / "scores"
    rows, done = score_into(out, bank_root, lambda: seg2d_target(target_root, 32, None), key, ["robustness"],
                            device="cpu", progress=False, seed=3)
    state = json.loads((out / STATE_FILE).read_text())
    assert not done and set(state["for"]) == {"entries", "estimators", "sampling", "seed", "target"}  # as before
    again, done = score_into(out, bank_root, lambda: seg2d_target(target_root, 32, None), key, ["robustness"],
                             device="cpu", progress=False, seed=3, robustness=DEFAULT_ROBUSTNESS)
    assert done and again == rows

    with pytest.raises(FileExistsError, match="robustness"):   # other settings are other scores
        score_into(out, bank_root, lambda: seg2d_target(target_root, 32, None), key, ["robustness"], device="cpu",
                   progress=False, seed=3, robustness=THESIS_L2)
    with pytest.raises(ValueError, match="robustness settings of its own"):  # they would be missing from the key
        score_into(tmp_path / "other", bank_root, lambda: seg2d_target(target_root, 32, None, robustness=THESIS_L2),
                   key, ["robustness"], device="cpu", progress=False, seed=3)
    rescored, done = score_into(out, bank_root, lambda: seg2d_target(target_root, 32, None), key, ["robustness"],
                                device="cpu", progress=False, seed=3, robustness=THESIS_L2, overwrite=True)
    assert not done
    assert rescored[0]["robustness"] == pytest.approx(
        _direct(bank_root, "unet2d_e1", target_root, pooled=False, distance="l2", margin=0.25, jitter=STRONG_JITTER),
        abs=1e-9)
    assert json.loads((out / STATE_FILE).read_text())["for"]["robustness"]["distance"] == "l2"


def test_robustness_alone_samples_no_voxel_features(bank_and_target, monkeypatch):
    bank_root, target_root = bank_and_target

    def refuse(*args, **kwargs):
        raise AssertionError("voxel features sampled for robustness alone")

    monkeypatch.setattr(score, "sample_dataset", refuse)
    rows = score_target(bank_root, seg2d_target(target_root, 32, None, robustness={"pooled": True}), ["robustness"],
                        device="cpu", progress=False, seed=3)
    assert [r["model"] for r in rows] == ["unet2d_e1", "unet2d_e2"]
    assert rows[1]["robustness"] == pytest.approx(_direct(bank_root, "unet2d_e2", target_root, pooled=True), abs=1e-9)
    with pytest.raises(ValueError, match="pooled is not set"):
        score_target(bank_root, seg2d_target(target_root, 32, None, robustness={"distance": "l2"}), ["robustness"],
                     device="cpu", progress=False)
