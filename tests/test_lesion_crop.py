"""TATL stage 1 lesion crop: box mapping working -> original, offset, clipping, crop / paste_back."""

import json

import numpy as np
import pytest
import torch

from medxfer.transforms.lesion_crop import Box, crop, lesion_box, paste_back

WORK = (384, 512)        # Segment-Net resolution (SPEC section 6)
ORIG = (767, 1022)       # non-integer scale factors 767/384, 1022/512


def _rect(size, rows, cols, dtype=bool):
    mask = np.zeros(size, dtype=dtype)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = 1
    return mask


def _disc(size, centre, radius, origin=(0.0, 0.0), step=(1.0, 1.0)):
    """Disc sampled at pixel centres: pixel (i, j) sits at original coordinate
    origin + (i + 0.5) * step - 0.5 (step 1: pixel i at coordinate i)."""
    y = origin[0] + (np.arange(size[0]) + 0.5) * step[0] - 0.5
    x = origin[1] + (np.arange(size[1]) + 0.5) * step[1] - 0.5
    d2 = (y[:, None] - centre[0]) ** 2 + (x[None, :] - centre[1]) ** 2
    return d2 <= radius ** 2, np.sqrt(d2)


def _centroid(mask):
    rows, cols = np.nonzero(mask)
    return rows.mean(), cols.mean()


def _iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


# -- lesion_box ------------------------------------------------------------------------------------


def test_box_maps_to_original_with_floor_start_ceil_end_on_non_integer_scale():
    mask = _rect(WORK, (100, 200), (150, 300))
    box = lesion_box(mask, offset=0, image_size=ORIG)
    # rows: 100 * 767/384 = 199.74 -> 199, 200 * 767/384 = 399.48 -> 400
    # cols: 150 * 1022/512 = 299.41 -> 299, 300 * 1022/512 = 598.83 -> 599
    assert box.as_tuple() == (199, 299, 400, 599) and not box.fallback
    # every original pixel [k, k + 1) overlapping the mapped lesion edges [100 s, 200 s) is inside,
    # and the box exceeds the exact edges by less than one pixel
    s_row, s_col = ORIG[0] / WORK[0], ORIG[1] / WORK[1]
    assert box.row0 <= 100 * s_row < box.row0 + 1 and box.row1 - 1 < 200 * s_row <= box.row1
    assert box.col0 <= 150 * s_col < box.col0 + 1 and box.col1 - 1 < 300 * s_col <= box.col1
    # so it covers the lesion upsampled to the original size by pixel-centre resampling
    source = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    for mode, level in [("nearest-exact", 0.5), ("bilinear", 0.5)]:
        up = torch.nn.functional.interpolate(source, size=ORIG, mode=mode)[0, 0].numpy() >= level
        rows, cols = np.nonzero(up)
        assert box.row0 <= rows.min() and rows.max() < box.row1
        assert box.col0 <= cols.min() and cols.max() < box.col1


def test_original_space_offset_is_added_exactly_after_mapping():
    mask = _rect(WORK, (100, 200), (150, 300))
    bare = lesion_box(mask, offset=0, image_size=ORIG)
    box = lesion_box(mask, offset=40, image_size=ORIG, offset_space="original")
    assert box.as_tuple() == (bare.row0 - 40, bare.col0 - 40, bare.row1 + 40, bare.col1 + 40)
    assert (box.height, box.width) == (bare.height + 80, bare.width + 80)


def test_working_space_offset_is_scaled_with_the_box_by_default():
    mask = _rect(WORK, (100, 200), (150, 300))
    box = lesion_box(mask, image_size=ORIG, mask_size=WORK)         # offset 40 working px (SPEC, paper)
    # rows (60, 240) * 767/384 = (119.84, 479.38); cols (110, 340) * 1022/512 = (219.57, 678.67)
    assert box.as_tuple() == (119, 219, 480, 679)
    # same as enlarging the working-resolution mask box by 40 and mapping it with offset 0
    enlarged = _rect(WORK, (60, 240), (110, 340))
    assert lesion_box(enlarged, offset=0, image_size=ORIG) == box


def test_offset_spaces_agree_without_rescaling():
    mask = _rect((300, 400), (100, 150), (120, 200))
    expected = (60, 80, 190, 240)
    assert lesion_box(mask).as_tuple() == expected
    assert lesion_box(mask, offset_space="original").as_tuple() == expected


@pytest.mark.parametrize("rows, cols, expected", [
    ((0, 10), (200, 260), (0, 319, 100, 599)),                        # top border
    ((374, 384), (200, 260), (667, 319, 767, 599)),       # bottom border: ends at H exactly
    ((150, 200), (0, 12), (219, 0, 480, 104)),            # left border
    ((150, 200), (500, 512), (219, 918, 480, 1022)),      # right border: ends at W exactly
    ((0, 384), (0, 512), (0, 0, 767, 1022)),              # lesion fills the image
])
def test_box_is_clipped_at_each_image_border(rows, cols, expected):
    box = lesion_box(_rect(WORK, rows, cols), image_size=ORIG)
    assert box.as_tuple() == expected and not box.fallback
    box.check_inside(ORIG)


def test_lesion_within_offset_of_the_corner_clips_both_sides_in_original_space():
    box = lesion_box(_rect(WORK, (5, 20), (500, 510)), image_size=ORIG, offset_space="original")
    assert (box.row0, box.col1) == (0, ORIG[1])


def test_empty_prediction_falls_back_to_the_whole_image_with_a_flag():
    probabilities = np.full(WORK, 0.3, dtype=np.float32)        # nothing above the threshold
    box = lesion_box(probabilities, image_size=ORIG)
    assert box.as_tuple() == (0, 0, *ORIG) and box.fallback
    assert box.to_dict()["fallback"] is True
    with pytest.raises(ValueError, match="empty"):
        lesion_box(probabilities, image_size=ORIG, empty="raise")


def test_probability_map_is_thresholded_and_torch_channel_first_is_accepted():
    rng = np.random.default_rng(0)
    prob = rng.uniform(0.0, 0.4, WORK).astype(np.float32)
    prob[50:80, 60:90] = rng.uniform(0.6, 1.0, (30, 30))
    reference = lesion_box(_rect(WORK, (50, 80), (60, 90)), image_size=ORIG)
    assert lesion_box(prob, image_size=ORIG) == reference
    assert lesion_box(torch.as_tensor(prob)[None], image_size=ORIG) == reference    # (1, H, W) tensor
    assert lesion_box(_rect(WORK, (50, 80), (60, 90), dtype=np.uint8) * 255, image_size=ORIG) == reference
    strict = lesion_box(prob, threshold=0.9, offset=0)                  # fewer pixels: box inside the square
    assert strict.row0 >= 50 and strict.col0 >= 60 and strict.row1 <= 80 and strict.col1 <= 90
    assert lesion_box(prob, threshold=0.1, offset=0).as_tuple() == (0, 0, *WORK)     # noise counts


def test_all_components_by_default_largest_only_on_request():
    mask = _rect((200, 300), (50, 100), (60, 120)) | _rect((200, 300), (150, 160), (250, 260))
    assert lesion_box(mask, offset=0).as_tuple() == (50, 60, 160, 260)
    assert lesion_box(mask, offset=0, largest_component=True).as_tuple() == (50, 60, 100, 120)
    diagonal = np.eye(20, dtype=bool)                                  # 8-connected: one component
    assert lesion_box(diagonal, offset=0, largest_component=True).as_tuple() == (0, 0, 20, 20)


# -- Box -------------------------------------------------------------------------------------------


def test_box_slices_sizes_and_json_round_trip():
    box = Box(3, 5, 10, 20)
    assert (box.height, box.width) == (7, 15)
    image = np.arange(30 * 40).reshape(30, 40)
    np.testing.assert_array_equal(image[box.as_slices()], image[3:10, 5:20])
    text = json.dumps(box.to_dict())
    assert Box.from_dict(json.loads(text)) == box
    assert json.loads(text) == {"row0": 3, "col0": 5, "row1": 10, "col1": 20, "fallback": False}


# -- crop / paste_back -----------------------------------------------------------------------------


def test_crop_keeps_layout_and_type():
    box = Box(10, 20, 40, 70)
    chw = torch.arange(3 * 100 * 120, dtype=torch.float32).reshape(3, 100, 120)
    out = crop(chw, box)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (3, 30, 50)
    assert torch.equal(out, chw[:, 10:40, 20:70])
    hwc = chw.permute(1, 2, 0).numpy()
    assert np.array_equal(crop(hwc, box), hwc[10:40, 20:70, :])
    assert np.array_equal(crop(hwc[..., 0], box), hwc[10:40, 20:70, 0])
    assert tuple(crop(chw[None], box).shape) == (1, 3, 30, 50)
    # ambiguous 3-D layout needs channel_first
    square = np.zeros((3, 100, 3))
    with pytest.raises(ValueError, match="channel_first"):
        crop(square, box)
    assert crop(np.zeros((3, 100, 120)), box, channel_first=True).shape == (3, 30, 50)


def test_crop_then_paste_back_is_exact_inside_and_zero_outside():
    rng = np.random.default_rng(1)
    mask = rng.random(ORIG) > 0.7                                       # speckle: any misplacement shows
    box = Box(123, 250, 461, 901)
    pasted = paste_back(crop(mask, box), box, ORIG)
    expected = np.zeros_like(mask)
    expected[123:461, 250:901] = mask[123:461, 250:901]
    assert pasted.dtype == mask.dtype and pasted.shape == ORIG
    assert np.array_equal(pasted, expected)
    # bilinear at the same size is an exact copy as well; torch in -> torch out
    prob = torch.as_tensor(rng.random(ORIG), dtype=torch.float32)
    out = paste_back(crop(prob, box), box, ORIG, mode="bilinear")
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == ORIG
    expected_prob = torch.zeros(ORIG)
    expected_prob[123:461, 250:901] = prob[123:461, 250:901]
    assert torch.equal(out, expected_prob)


def _predict_disc_at(box, net_size, centre, radius, soft=False):
    """What a perfect stage 2-3 network predicts at ``net_size`` for the crop ``box``: the disc sampled
    at the network's pixel centres (independent of paste_back's resampling)."""
    step = (box.height / net_size[0], box.width / net_size[1])
    inside, dist = _disc(net_size, centre, radius, origin=(box.row0, box.col0), step=step)
    if soft:
        return 1.0 / (1.0 + np.exp((dist - radius) / 2.0))             # probability, 0.5 on the edge
    return inside


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_resized_crop_prediction_lands_aligned_with_the_original_disc(mode):
    centre, radius = (425.3, 530.7), 90.0
    truth, _ = _disc(ORIG, centre, radius)
    box = Box(300, 380, 550, 680)                                       # a 250 x 300 crop
    prediction = _predict_disc_at(box, (128, 128), centre, radius, soft=(mode == "bilinear"))
    pasted = paste_back(prediction, box, ORIG, mode=mode)
    assert pasted.shape == ORIG
    hard = pasted > 0.5 if mode == "bilinear" else pasted
    assert _iou(hard, truth) > 0.95
    # centroid within a quarter pixel: torch's legacy "nearest" (shifted by up to half a source
    # pixel) is off by 0.37 / 0.50 px here, ours by 0.11 / 0.06
    assert np.allclose(_centroid(hard), _centroid(truth), atol=0.25)
    rows, cols = np.nonzero(hard)
    t_rows, t_cols = np.nonzero(truth)
    for got, want in [(rows.min(), t_rows.min()), (rows.max(), t_rows.max()),
                      (cols.min(), t_cols.min()), (cols.max(), t_cols.max())]:
        assert abs(int(got) - int(want)) <= 1
    assert not hard[:box.row0].any() and not hard[box.row1:].any()


def test_full_pipeline_working_prediction_to_original_mask():
    centre, radius = (400.0, 600.0), 120.0
    truth, _ = _disc(ORIG, centre, radius)
    working, _ = _disc(WORK, centre, radius, step=(ORIG[0] / WORK[0], ORIG[1] / WORK[1]))
    box = lesion_box(working, image_size=ORIG)
    t_rows, t_cols = np.nonzero(truth)
    assert box.row0 < t_rows.min() and t_rows.max() < box.row1 - 1
    assert box.col0 < t_cols.min() and t_cols.max() < box.col1 - 1
    pasted = paste_back(_predict_disc_at(box, (256, 256), centre, radius), box, ORIG)
    assert _iou(pasted, truth) > 0.97
    assert np.allclose(_centroid(pasted), _centroid(truth), atol=0.25)


def test_bilinear_paste_keeps_probabilities_in_unit_interval():
    rng = np.random.default_rng(2)
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)    # extreme 0/1 alternation
    for prediction, box in [(checker, Box(10, 10, 300, 500)),        # upsampling
                            (checker, Box(0, 0, 20, 30)),            # downsampling (antialiased)
                            (rng.random((3, 50, 70)), Box(5, 7, 105, 57))]:   # per-attribute channels
        out = paste_back(prediction, box, (400, 600), mode="bilinear")
        assert out.shape == (*prediction.shape[:-2], 400, 600)
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert paste_back(torch.ones(1, 8, 8, dtype=torch.float64), Box(0, 0, 33, 17), (40, 40),
                      mode="bilinear").max() == 1.0


# -- bad inputs ------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_value_errors():
    mask = _rect(WORK, (100, 200), (150, 300))
    with pytest.raises(ValueError, match="outside the image"):
        crop(np.zeros((50, 60)), Box(10, 10, 51, 20))
    with pytest.raises(ValueError, match="outside the image"):
        paste_back(np.ones((8, 8)), Box(0, 55, 10, 61), (50, 60))
    with pytest.raises(ValueError, match="non-empty"):
        Box(10, 10, 10, 20)
    with pytest.raises(ValueError, match=">= 0"):
        Box(-1, 0, 10, 20)
    with pytest.raises(ValueError, match="integer"):
        Box(0.5, 0, 10, 20)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(1, H, W\)"):
        lesion_box(np.zeros((2, *WORK)))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(1, H, W\)"):
        lesion_box(np.zeros(10))
    with pytest.raises(ValueError, match="mask_size"):
        lesion_box(mask, mask_size=(386, 512))
    with pytest.raises(ValueError, match="image_size"):
        lesion_box(mask, image_size=(767, 1022, 3))
    with pytest.raises(ValueError, match="offset_space"):
        lesion_box(mask, offset_space="pixels")
    with pytest.raises(ValueError, match="offset"):
        lesion_box(mask, offset=-5)
    with pytest.raises(ValueError, match="empty"):
        lesion_box(mask, empty="center")
    with pytest.raises(ValueError, match="image must be"):
        crop(np.zeros((2, 2, 3, 50, 60)), Box(0, 0, 10, 10))
    with pytest.raises(ValueError, match="crop_mask"):
        paste_back(np.zeros(8), Box(0, 0, 10, 10), (50, 60))
    with pytest.raises(ValueError, match="mode"):
        paste_back(np.zeros((8, 8)), Box(0, 0, 10, 10), (50, 60), mode="bicubic")
