"""Dermoscopy chains: orientation, shapes, mask values, normalisation against numpy, augmentation."""

import numpy as np
import pytest
import torch
from PIL import Image

from medxfer.transforms.dermoscopy import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    dermoscopy_channel_stats,
    dermoscopy_transforms,
    resize_for_scoring,
    scoring_transforms,
)

H, W = 60, 100  # non-square on purpose: rows != columns
SPOT = (10, 78)  # top-left (row, col) of a 4x4 bright spot, top right of the image
SMALL = (48, 64)  # small output size (H, W) keeps the tests fast


def _spot_case(tmp_path, fmt="png"):
    """Black RGB image with a white 4x4 spot at SPOT, and a lesion mask (0/255) on the same spot."""
    img = np.zeros((H, W, 3), np.uint8)
    img[SPOT[0]:SPOT[0] + 4, SPOT[1]:SPOT[1] + 4] = 255
    mask = np.zeros((H, W), np.uint8)
    mask[SPOT[0]:SPOT[0] + 4, SPOT[1]:SPOT[1] + 4] = 255
    Image.fromarray(img).save(tmp_path / f"spot.{fmt}", **({"quality": 100} if fmt == "jpg" else {}))
    Image.fromarray(mask).save(tmp_path / "spot_mask.png")
    return {"id": "ISIC_0000000", "image": str(tmp_path / f"spot.{fmt}"), "lesion": str(tmp_path / "spot_mask.png")}


def _blob_case(tmp_path, seed=0):
    """RGB image whose red channel is the lesion mask (an asymmetric L shape + random blobs), green/blue noise."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((H, W), np.uint8)
    mask[8:40, 10:22] = 255
    mask[30:40, 10:60] = 255
    for _ in range(3):
        r, c = rng.integers(5, H - 10), rng.integers(5, W - 10)
        mask[r:r + 6, c:c + 8] = 255
    img = np.stack([mask, rng.integers(0, 120, (H, W)), rng.integers(0, 120, (H, W))], axis=-1).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / f"blob{seed}.png")
    Image.fromarray(mask).save(tmp_path / f"blob{seed}_mask.png")
    return {"image": str(tmp_path / f"blob{seed}.png"), "lesion": str(tmp_path / f"blob{seed}_mask.png")}, img, mask


def _unnormalise(image):
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    return np.asarray(image) * std + mean


def test_loading_keeps_rows_first_on_a_non_square_image(tmp_path):
    out = dermoscopy_transforms("eval", size=None)(_spot_case(tmp_path))
    assert tuple(out["image"].shape) == (3, H, W) and tuple(out["lesion"].shape) == (1, H, W)
    rows, cols = np.nonzero(out["lesion"][0].numpy())
    assert (rows.min(), cols.min(), rows.max(), cols.max()) == (SPOT[0], SPOT[1], SPOT[0] + 3, SPOT[1] + 3)
    bright = _unnormalise(out["image"]).min(axis=0) > 0.99  # white in every channel
    assert np.array_equal(bright, out["lesion"][0].numpy() > 0)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_bright_spot_keeps_its_relative_position_after_resizing(tmp_path, fmt):
    out = dermoscopy_transforms("eval", size=SMALL)(_spot_case(tmp_path, fmt))
    centre = np.array(SPOT) + 2.0  # continuous centre (row, col) of the 4x4 spot
    expected = centre / np.array([H, W]) * np.array(SMALL)
    brightness = _unnormalise(out["image"]).sum(axis=0)
    found = np.array(np.unravel_index(np.argmax(brightness), SMALL)) + 0.5
    assert np.abs(found - expected).max() <= 1.0
    rows, cols = np.nonzero(out["lesion"][0].numpy())
    assert np.abs(np.array([rows.mean(), cols.mean()]) + 0.5 - expected).max() <= 1.0


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_shapes_and_dtypes_at_the_training_size(tmp_path, mode):
    chain = dermoscopy_transforms(mode, label_key="label")
    chain.set_random_state(0)
    out = chain(_spot_case(tmp_path))
    assert tuple(out["image"].shape) == (3, 384, 512) and out["image"].dtype == torch.float32
    assert tuple(out["lesion"].shape) == (1, 384, 512) and out["lesion"].dtype == torch.float32
    assert tuple(out["label"].shape) == (1, 384, 512) and torch.equal(out["label"], out["lesion"])


def test_infer_mode_loads_the_image_only_and_inverts_to_the_original_size(tmp_path):
    from monai.transforms import Invertd

    chain = dermoscopy_transforms("infer", size=SMALL)
    out = chain(_spot_case(tmp_path))
    assert tuple(out["image"].shape) == (3, *SMALL) and isinstance(out["lesion"], str)
    out["pred"] = out["image"][:1].clone()
    back = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)(out)["pred"]
    assert tuple(back.shape) == (1, H, W)


def test_masks_stay_binary_after_nearest_resizing(tmp_path):
    rng = np.random.default_rng(3)
    mask = (rng.random((H, W)) > 0.5).astype(np.uint8) * 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "i.png")
    record = {"image": str(tmp_path / "i.png"), "lesion": str(tmp_path / "m.png")}
    for mode in ("eval", "train"):
        out = dermoscopy_transforms(mode, size=(37, 83))(record)["lesion"]
        assert set(np.unique(out.numpy())) == {0.0, 1.0}
    gt = scoring_transforms("lesion")(record)["lesion"]
    assert tuple(gt.shape) == (1, 256, 256) and set(np.unique(gt.numpy())) == {0.0, 1.0}


def test_normalisation_is_x_over_255_minus_mean_over_std(tmp_path):
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (*SMALL, 3), dtype=np.uint8)  # already at the output size: no resampling
    Image.fromarray(img).save(tmp_path / "n.png")
    record = {"image": str(tmp_path / "n.png")}
    mean_c, std_c = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    expected = (img.transpose(2, 0, 1) / 255.0 - mean_c) / std_c
    out = dermoscopy_transforms("infer", size=SMALL)(record)["image"]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    # dataset statistics instead of ImageNet ones
    mean, std = dermoscopy_channel_stats([record], size=None)
    x = img.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-5)
    out = dermoscopy_transforms("infer", size=SMALL, mean=mean, std=std)(record)["image"].numpy()
    np.testing.assert_allclose(out.reshape(3, -1).mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(3, -1).std(axis=1), 1.0, atol=1e-4)


def test_augmentation_is_deterministic_for_a_seed(tmp_path):
    record, _, _ = _blob_case(tmp_path)

    def run(seed):
        chain = dermoscopy_transforms("train", size=SMALL)
        chain.set_random_state(seed)
        return [chain(record) for _ in range(3)]

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["lesion"], b["lesion"])
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_and_mask_get_the_same_random_spatial_transform(tmp_path, seed):
    record, _, _ = _blob_case(tmp_path, seed)
    plain = dermoscopy_transforms("eval", size=SMALL)(record)["lesion"][0].numpy() > 0
    chain = dermoscopy_transforms("train", size=SMALL, prob=1.0, brightness=0.0, contrast=0.0)
    chain.set_random_state(seed)
    out = chain(record)
    mask = out["lesion"][0].numpy() > 0
    red = _unnormalise(out["image"])[0] > 0.5  # the red channel carries the mask
    assert not np.array_equal(mask, plain)  # the spatial transform did move things
    iou = (mask & red).sum() / (mask | red).sum()
    assert iou > 0.9, iou
    assert np.logical_xor(mask, red).sum() <= 0.05 * mask.size


def test_intensity_augmentation_changes_the_image_only(tmp_path):
    record, _, _ = _blob_case(tmp_path)
    chain = dermoscopy_transforms("train", size=SMALL, prob=1.0, rotate_deg=0.0, shift=0.0, zoom=0.0)
    chain.set_random_state(5)
    out = chain(record)
    plain = dermoscopy_transforms("eval", size=SMALL)(record)
    flipped = np.flip(plain["lesion"].numpy(), axis=(1, 2))  # prob=1: both flips always happen
    assert np.array_equal(out["lesion"].numpy(), flipped)
    x = _unnormalise(out["image"])
    assert x.min() >= -1e-5 and x.max() <= 1 + 1e-5  # clipped to 0..1 before normalising
    assert not np.allclose(x, np.flip(_unnormalise(plain["image"]), axis=(1, 2)), atol=1e-3)


def test_isic_records_run_through_train_and_eval_chains(tmp_path):
    from medxfer.data.isic import load_isic
    from medxfer.data.synth.isic import generate_isic

    root = generate_isic(tmp_path / "isic", year=2018, num_images=2, seed=0)
    records = load_isic(root)
    keys = ["lesion"] + [f"attribute_{a}" for a in sorted(records[0]["attributes"])]
    for mode in ("train", "eval"):
        out = dermoscopy_transforms(mode, size=SMALL, mask_keys=keys, label_key="label")(records[0])
        assert tuple(out["image"].shape) == (3, *SMALL)
        assert tuple(out["label"].shape) == (len(keys), *SMALL)
        assert set(np.unique(out["label"].numpy())) <= {0.0, 1.0} and out["label"][0].sum() > 0
    loaded = np.asarray(Image.open(records[0]["image"]))
    eval_full = dermoscopy_transforms("eval", size=None, mask_keys=keys)(records[0])
    assert tuple(eval_full["image"].shape[1:]) == loaded.shape[:2]


def test_resize_for_scoring_binary_and_probabilities():
    mask = np.zeros((90, 120), np.uint8)
    mask[:45, 60:] = 255  # top-right quarter
    out = resize_for_scoring(mask)
    assert out.shape == (256, 256) and out.dtype == bool
    assert out[:128, 128:].all() and not out[128:].any() and not out[:, :128].any()
    stack = resize_for_scoring(torch.as_tensor(np.stack([mask > 0, mask == 0])), size=(64, 32))
    assert stack.shape == (2, 64, 32) and np.array_equal(stack[0], ~stack[1])
    prob = np.linspace(0.0, 1.0, 120)[None].repeat(90, axis=0)  # left-to-right ramp
    thresholded = resize_for_scoring(prob, threshold=0.5)
    assert thresholded[:, :127].sum() == 0 and thresholded[:, 129:].all()
    with pytest.raises(ValueError, match="shape"):
        resize_for_scoring(np.zeros((1, 1, 4, 4)))


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="mode"):
        dermoscopy_transforms("validate")
    with pytest.raises(ValueError, match="channel"):
        dermoscopy_transforms("eval", mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="size"):
        dermoscopy_transforms("eval", size=(384, 512, 3))
