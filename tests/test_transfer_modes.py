"""Transfer modes: which tensors come from the checkpoint, which keep their init, what is frozen."""

import pytest
import torch

from medxfer.networks.registry import build_network
from medxfer.transfer.weights import (TRANSFER_MODES, PartialTransferError, TransferReport, init_from_checkpoint,
                                       parse_mode, trainable_parameters)

UNET_KWARGS = {"channels": (4, 8, 16), "strides": (2, 2)}
ROI = [16, 16, 16]
# Written out by hand (not taken from arch_layout): the 3-level MONAI UNet's module tree.
LEVEL_PREFIXES = {1: "model.0.", 2: "model.1.submodule.0.", 3: "model.1.submodule.1.submodule."}
HEAD_PREFIX = "model.2."


def _unet(seed, out_channels, in_channels=1):
    torch.manual_seed(seed)
    return build_network("unet", in_channels, out_channels, ROI, **UNET_KWARGS)


def _level(key):
    hits = [lv for lv, p in LEVEL_PREFIXES.items() if key.startswith(p)]
    assert len(hits) <= 1
    return hits[0] if hits else None


def _source_state(out_channels=3, in_channels=1):
    """Source weights (seed 1), shifted by 1 so that no tensor equals the target's init by chance
    (e.g. PReLU weights start at 0.25 in every fresh network)."""
    return {k: v + 1.0 for k, v in _unet(1, out_channels, in_channels).state_dict().items()}


def _target(out_channels=2):
    net = _unet(2, out_channels)
    return net, {k: v.clone() for k, v in net.state_dict().items()}


def _assert_loaded_exactly(net, init, state, keys):
    """``keys`` hold the checkpoint's tensors, every other key its own initialisation."""
    now = net.state_dict()
    for key in now:
        expected = state[key] if key in keys else init[key]
        assert torch.equal(now[key], expected), key
        assert not torch.equal(now[key], init[key] if key in keys else state.get(key, init[key] + 1)), key


def test_modes_parse_and_every_documented_mode_is_accepted():
    assert parse_mode("truncated:3") == ("truncated", 3)
    assert parse_mode(" all_but_head ") == ("all_but_head", None)
    for mode in TRANSFER_MODES:
        parse_mode(mode.replace(":k", ":2"))


def test_all_but_head_copies_every_non_head_tensor_and_keeps_the_head_init():
    state = _source_state(out_channels=3)
    net, init = _target(out_channels=2)
    report = init_from_checkpoint(net, state, "all_but_head", "unet")
    head = sorted(k for k in init if k.startswith(HEAD_PREFIX))
    body = sorted(k for k in init if not k.startswith(HEAD_PREFIX))
    assert head and body
    _assert_loaded_exactly(net, init, state, set(body))
    assert report.loaded == body
    assert report.initialised == head
    assert sorted(report.skipped_by_mode + list(report.shape_mismatch)) == head
    assert report.not_in_network == [] and report.frozen == []
    assert all(p.requires_grad for p in net.parameters())


def test_full_with_the_same_classes_loads_the_head_too():
    state = _source_state(out_channels=2)
    net, init = _target(out_channels=2)
    report = init_from_checkpoint(net, state, "full", "unet")
    _assert_loaded_exactly(net, init, state, set(init))
    assert report.loaded == sorted(init)
    assert report.initialised == [] and report.skipped_by_mode == [] and report.shape_mismatch == {}


def test_full_with_other_classes_is_refused_unless_partial_is_allowed_then_reports_the_head_mismatches():
    state = _source_state(out_channels=3)
    net, init = _target(out_channels=2)
    mismatched = {k: [list(state[k].shape), list(init[k].shape)] for k in init if state[k].shape != init[k].shape}
    assert mismatched and all(k.startswith(HEAD_PREFIX) for k in mismatched)
    with pytest.raises(PartialTransferError, match=f"loaded {len(init) - len(mismatched)} of {len(init)} required"):
        init_from_checkpoint(net, state, "full", "unet")  # full = every tensor, the head too
    assert all(torch.equal(v, init[k]) for k, v in net.state_dict().items())  # refused before loading
    report = init_from_checkpoint(net, state, "full", "unet", allow_partial=True)
    assert sorted(report.missing) == sorted(mismatched) and not report.complete
    assert report.shape_mismatch == mismatched
    _assert_loaded_exactly(net, init, state, set(init) - set(mismatched))
    assert report.initialised == sorted(mismatched)


def test_frozen_encoder_sgd_step_changes_only_decoder_and_head():
    state = _source_state(out_channels=3)
    net, _ = _target(out_channels=2)
    report = init_from_checkpoint(net, state, "frozen_encoder", "unet")
    names = dict(net.named_parameters())
    encoder = sorted(n for n in names if _level(n) is not None)
    assert sorted(report.frozen) == encoder
    assert all(not names[n].requires_grad for n in encoder)
    assert all(names[n].requires_grad for n in names if n not in encoder)

    params = trainable_parameters(net)
    assert {id(p) for p in params} == {id(names[n]) for n in names if n not in encoder}
    opt = torch.optim.SGD(params, lr=0.1)
    assert {id(p) for g in opt.param_groups for p in g["params"]}.isdisjoint({id(names[n]) for n in encoder})

    before = {n: p.detach().clone() for n, p in names.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, *ROI, generator=g)
    y = torch.randint(0, 2, (2, *ROI), generator=g)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(names[n].grad is None for n in encoder)
    for n in encoder:
        assert torch.equal(names[n], before[n]), n
        assert torch.equal(names[n], state[n]), n  # still the loaded source weights
    changed = [n for n in names if n not in encoder and not torch.equal(names[n], before[n])]
    assert any(not n.startswith(HEAD_PREFIX) for n in changed), changed
    assert any(n.startswith(HEAD_PREFIX) for n in changed), changed


@pytest.mark.parametrize("k", [1, 2, 3])
def test_truncated_k_loads_exactly_the_encoder_levels_up_to_k(k):
    state = _source_state(out_channels=3)
    net, init = _target(out_channels=2)
    report = init_from_checkpoint(net, state, f"truncated:{k}", "unet")
    expected = sorted(key for key in init if _level(key) is not None and _level(key) <= k)
    assert expected and {_level(key) for key in expected} == set(range(1, k + 1))
    _assert_loaded_exactly(net, init, state, set(expected))
    assert report.loaded == expected
    assert sorted(report.skipped_by_mode) == sorted(set(state) - set(expected))
    assert report.initialised == sorted(set(init) - set(expected))
    assert report.frozen == []


def test_scratch_loads_nothing():
    state = _source_state(out_channels=2)
    net, init = _target(out_channels=2)
    report = init_from_checkpoint(net, state, "scratch", "unet")
    _assert_loaded_exactly(net, init, state, set())
    assert report.loaded == [] and sorted(report.skipped_by_mode) == sorted(state)
    assert report.initialised == sorted(init)


def test_source_with_other_input_channels_mismatches_the_first_convs_and_loads_the_rest_if_allowed():
    state = _source_state(out_channels=3, in_channels=2)
    net, init = _target(out_channels=2)
    with pytest.raises(PartialTransferError, match=r"model\.0\.conv\.unit0\.conv\.weight \(4,2,3,3,3\) vs \(4,1,3,3,3\)"):
        init_from_checkpoint(net, state, "all_but_head", "unet")
    report = init_from_checkpoint(net, state, "all_but_head", "unet", allow_partial=True)
    reads_input = {"model.0.conv.unit0.conv.weight", "model.0.residual.weight"}  # the convs on the image
    assert report.shape_mismatch == {k: [list(state[k].shape), list(init[k].shape)] for k in reads_input}
    assert report.shape_mismatch["model.0.conv.unit0.conv.weight"] == [[4, 2, 3, 3, 3], [4, 1, 3, 3, 3]]
    body = {k for k in init if not k.startswith(HEAD_PREFIX)} - reads_input
    _assert_loaded_exactly(net, init, state, body)
    assert report.loaded == sorted(body)


def test_checkpoint_keys_the_network_lacks_are_reported():
    state = {**_source_state(out_channels=2), "extra.weight": torch.ones(3)}
    net, init = _target(out_channels=2)
    report = init_from_checkpoint(net, state, "full", "unet")
    assert report.not_in_network == ["extra.weight"]
    assert report.loaded == sorted(init)


@pytest.mark.parametrize("mode, match", [("truncated:99", "encoder levels"), ("truncated:4", "encoder levels"),
                                         ("truncated:x", "truncated:k"), ("truncated:0", "truncated:k"),
                                         ("truncated", "truncated:k"), ("half_frozen", "unknown transfer mode")])
def test_invalid_modes_are_refused_and_leave_the_network_untouched(mode, match):
    net, init = _target(out_channels=2)
    with pytest.raises(ValueError, match=match):
        init_from_checkpoint(net, _source_state(out_channels=2), mode, "unet")
    for key, value in net.state_dict().items():
        assert torch.equal(value, init[key]), key


def test_report_counts_match_the_lists():
    report = init_from_checkpoint(_target(2)[0], {**_source_state(3, in_channels=2), "extra": torch.zeros(1)},
                                  "frozen_encoder", "unet", allow_partial=True)
    d = report.to_dict()
    fields = ["loaded", "skipped_by_mode", "shape_mismatch", "not_in_network", "initialised", "frozen", "required",
              "missing"]
    assert d["allow_partial"] is True and d["complete"] is False
    assert d["mode"] == "frozen_encoder"
    assert set(d["counts"]) == set(fields)
    for f in fields:
        assert d["counts"][f] == len(d[f]) == len(getattr(report, f)) > 0, f
    assert isinstance(report, TransferReport)


def test_trainable_parameters_refuses_a_fully_frozen_network():
    net, _ = _target(2)
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        trainable_parameters(net)


def test_unetr_all_but_head_skips_only_the_out_block():
    kwargs = {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}
    torch.manual_seed(1)
    state = {k: v + 1.0 for k, v in build_network("unetr", 1, 3, [32, 32, 32], **kwargs).state_dict().items()}
    torch.manual_seed(2)
    net = build_network("unetr", 1, 2, [32, 32, 32], **kwargs)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    report = init_from_checkpoint(net, state, "all_but_head", "unetr")
    out_keys = sorted(k for k in init if k.startswith("out."))
    assert out_keys == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert sorted(report.skipped_by_mode) == out_keys
    assert report.shape_mismatch == {} and report.not_in_network == []
    assert report.loaded == sorted(set(init) - set(out_keys))
    _assert_loaded_exactly(net, init, state, set(report.loaded))


def test_unetr_position_embeddings_are_resampled_to_the_new_patch_grid():
    import math

    from medxfer.transfer.weights import resize_position_embeddings

    # a smooth (linear) embedding field stays linear under trilinear resampling: check it exactly
    src, dst, hidden = [2, 2, 1], [4, 2, 2], 3
    coords = torch.stack(torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in src], indexing="ij"), -1)
    pos = torch.cat([coords.reshape(1, -1, 3)[..., :2], torch.ones(1, math.prod(src), 1)], -1)[..., :hidden]
    out, changed = resize_position_embeddings({"vit.patch_embedding.position_embeddings": pos}, src, dst)
    new = out["vit.patch_embedding.position_embeddings"]
    assert changed and new.shape == (1, math.prod(dst), hidden)
    grid = new.reshape(*dst, hidden)
    # axis 0: 2 -> 4 with align_corners=False samples source coordinates -0.25, 0.25, 0.75, 1.25 (clamped)
    torch.testing.assert_close(grid[:, 0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    torch.testing.assert_close(grid[..., 2], torch.ones(dst))
    same, changed = resize_position_embeddings({"vit.patch_embedding.position_embeddings": pos}, src, src)
    assert not changed and torch.equal(same["vit.patch_embedding.position_embeddings"], pos)
    with pytest.raises(ValueError, match="patch grid"):
        resize_position_embeddings({"vit.patch_embedding.position_embeddings": pos}, [3, 3, 3], dst)


def test_bank_unetr_fine_tuned_at_another_patch_loads_resampled_position_embeddings(tmp_path):
    import json

    from medxfer.transfer.bank import ModelBank
    from medxfer.transfer.weights import resize_position_embeddings
    from medxfer.workflows.msd_seg3d import load_bank_network

    kw = {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}
    source = build_network("unetr", 1, 2, [32, 32, 16], **kw)
    bank = ModelBank.open(tmp_path / "bank", create=True)
    bank.add("unetr_src", source, arch="unetr", in_channels=1, out_channels=2, patch_size=[32, 32, 16], arch_kwargs=kw)
    net = load_bank_network(tmp_path / "bank", "unetr_src", 1, 3, [64, 32, 32], report_file=tmp_path / "r.json")
    key = "vit.patch_embedding.position_embeddings"
    expected, _ = resize_position_embeddings(source.state_dict(), [2, 2, 1], [4, 2, 2])
    assert torch.equal(net.state_dict()[key], expected[key])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["position_embeddings_resized"] and key in report["loaded"] and key not in report["shape_mismatch"]
