"""Fault injection, transfers (issue 13, item 2): a transfer that loads less than its mode requires
fails with one line naming the checkpoint, unless ``allow_partial`` (then one WARNING line); weights
that fit nothing are always an error; ``bank list`` reads every checkpoint weights-only."""

import hashlib
import json
import logging
import re

import pytest
import torch
import yaml

from medxfer.networks.registry import arch_layout, build_network
from medxfer.transfer.bank import BankError, ModelBank
from medxfer.transfer.weights import (NoMatchingWeights, PartialTransferError, init_from_checkpoint,
                                      load_encoder_weights, required_keys)
from medxfer.workflows.msd_seg3d import load_bank_network

KW = {"channels": (4, 8, 16), "strides": (2, 2)}
PATCH = [16, 16, 16]
FIRST_CONV = "model.0.conv.unit0.conv.weight"  # the convs that read the image (written out by hand)
FIRST_RESIDUAL = "model.0.residual.weight"


def _shifted(net):
    """State dict no fresh network equals by chance (PReLU weights start at 0.25 everywhere)."""
    return {k: (v + 1.0 if v.is_floating_point() else v.clone()) for k, v in net.state_dict().items()}


def _bank(tmp_path, name, net, arch="unet", in_channels=1, out_channels=3, kwargs=KW):
    bank = ModelBank.open(tmp_path / "bank", create=True)
    bank.add(name, _shifted(net), arch=arch, in_channels=in_channels, out_channels=out_channels, patch_size=PATCH,
             arch_kwargs=kwargs, source=["Task03_Liver"], epoch=2)
    return bank


def _transfer_records(caplog):
    return [r for r in caplog.records if r.name == "medxfer.transfer"]


def test_bank_entry_whose_arch_does_not_match_its_weights_is_an_error_naming_the_checkpoint(tmp_path, caplog):
    torch.manual_seed(0)
    unetr = build_network("unetr", 1, 3, PATCH, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)
    bank = _bank(tmp_path, "liver_e2", unetr, arch="unet")  # bank.yaml says unet; the weights are a UNETR's
    ckpt = bank.checkpoint_path("liver_e2")
    for mode in ("all_but_head", "full", "encoder_only"):
        with pytest.raises(BankError) as err, caplog.at_level(logging.INFO, logger="medxfer.transfer"):
            load_bank_network(tmp_path / "bank", "liver_e2", 1, 2, PATCH, mode, allow_partial=True)  # never accepted
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{ckpt}: ")
        assert "bank.yaml says entry 'liver_e2' is arch 'unet'" in message and "look like a different network" in message
        assert "no tensor matches the unet network" in message and "0 of " in message
    assert _transfer_records(caplog) == []  # nothing loaded, nothing reported as a transfer

    net = build_network("unet", 1, 2, PATCH, **KW)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NoMatchingWeights, match=re.escape("state dict: the checkpoint holds no tensor")):
        init_from_checkpoint(net, {}, "all_but_head", "unet")
    with pytest.raises(NoMatchingWeights, match="weights.pt: no tensor matches"):
        init_from_checkpoint(net, unetr.state_dict(), "truncated:1", "unet", source="weights.pt", allow_partial=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # refused before loading


def test_two_channel_entry_on_a_one_channel_task_fails_listing_the_first_conv_and_its_shapes(tmp_path):
    torch.manual_seed(0)
    bank = _bank(tmp_path, "prostate_e2", build_network("unet", 2, 3, PATCH, **KW), in_channels=2)
    ckpt = bank.checkpoint_path("prostate_e2")
    report_file = tmp_path / "ft" / "transfer_report.json"
    for mode in ("all_but_head", "frozen_encoder", "encoder_only", "truncated:1"):
        with pytest.raises(PartialTransferError) as err:
            load_bank_network(tmp_path / "bank", "prostate_e2", 1, 2, PATCH, mode, report_file=report_file)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{ckpt}: transfer {mode} loaded ")
        required = err.value.report.required
        assert re.search(rf"loaded {len(required) - 2} of {len(required)} required tensors", message)
        assert f"{FIRST_CONV} (4,2,3,3,3) vs (4,1,3,3,3)" in message
        assert f"{FIRST_RESIDUAL} (4,2,3,3,3) vs (4,1,3,3,3)" in message
        assert "allow_partial" in message
    assert not report_file.exists()  # no run folder claims a transfer that did not happen


def test_two_channel_entry_with_allow_partial_loads_the_rest_and_logs_one_warning_line(tmp_path, caplog):
    torch.manual_seed(0)
    source_net = build_network("unet", 2, 3, PATCH, **KW)
    bank = _bank(tmp_path, "prostate_e2", source_net, in_channels=2)
    source = bank.load_state_dict("prostate_e2")
    report_file = tmp_path / "ft" / "transfer_report.json"
    with caplog.at_level(logging.INFO, logger="medxfer.transfer"):
        net = load_bank_network(tmp_path / "bank", "prostate_e2", 1, 2, PATCH, "all_but_head",
                                report_file=report_file, allow_partial=True)
    records = _transfer_records(caplog)
    assert [r.levelname for r in records] == ["WARNING"]
    line = records[0].getMessage()
    assert "\n" not in line and line.startswith(f"transfer all_but_head from {bank.checkpoint_path('prostate_e2')}: ")
    layout = arch_layout("unet", net)
    own = net.state_dict()
    head = sorted(k for k in own if layout.in_head(k))
    body = sorted(set(own) - set(head) - {FIRST_CONV, FIRST_RESIDUAL})
    assert f"loaded {len(body)}/{len(own)}" in line
    assert f"shape mismatch 2 ({FIRST_CONV} (4,2,3,3,3) vs (4,1,3,3,3)" in line
    assert f"initialised {len(head) + 2}" in line and "partial transfer accepted (allow_partial)" in line
    for key in body:  # everything that fits is the source's, the first convs and the head are fresh
        assert torch.equal(own[key], source[key]), key
    assert own[FIRST_CONV].shape == (4, 1, 3, 3, 3)
    report = json.loads(report_file.read_text())
    assert report["allow_partial"] is True and report["complete"] is False
    assert report["missing"] == sorted([FIRST_CONV, FIRST_RESIDUAL])
    assert report["shape_mismatch"][FIRST_CONV] == [[4, 2, 3, 3, 3], [4, 1, 3, 3, 3]]


class _TouchesAFile:
    """Pickled payload that would create ``path`` if it were ever unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bank_list_flags_a_checkpoint_holding_a_pickled_object_and_exits_1(tmp_path, capsys):
    from medxfer.cli import main

    torch.manual_seed(0)
    bank = _bank(tmp_path, "good_e1", build_network("unet", 1, 3, PATCH, **KW))
    bank.add("evil_e1", build_network("unet", 1, 3, PATCH, **KW), arch="unet", in_channels=1, out_channels=3,
             patch_size=PATCH, arch_kwargs=KW)
    evil = bank.checkpoint_path("evil_e1")
    marker = tmp_path / "code_was_executed"
    torch.save({"model.0.conv.unit0.conv.weight": torch.zeros(4, 1, 3, 3, 3), "obj": _TouchesAFile(marker)}, evil)
    manifest = yaml.safe_load(bank.manifest.read_text())  # the manifest agrees with the file: only reading tells
    for entry in manifest["entries"]:
        if entry["name"] == "evil_e1":
            entry["sha256"] = hashlib.sha256(evil.read_bytes()).hexdigest()
    bank.manifest.write_text(yaml.safe_dump(manifest, sort_keys=False))

    assert main(["bank", "list", str(tmp_path / "bank")]) == 1
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["good_e1"].endswith("ok")
    assert "BROKEN" in lines["evil_e1"] and str(evil) in lines["evil_e1"] and "pickled" in lines["evil_e1"]
    assert not marker.exists()  # refused, not executed
    with pytest.raises(BankError, match=re.escape(str(evil)) + ".*pickled"):
        ModelBank.open(tmp_path / "bank").verify("evil_e1")


def test_complete_all_but_head_transfer_logs_info_only_and_copies_every_non_head_tensor(tmp_path, caplog):
    torch.manual_seed(0)
    bank = _bank(tmp_path, "liver_e2", build_network("unet", 1, 3, PATCH, **KW))
    source = bank.load_state_dict("liver_e2")
    torch.manual_seed(1)
    fresh = build_network("unet", 1, 2, PATCH, **KW).state_dict()
    torch.manual_seed(1)  # the same initialisation inside load_bank_network
    with caplog.at_level(logging.DEBUG, logger="medxfer.transfer"):
        net = load_bank_network(tmp_path / "bank", "liver_e2", 1, 2, PATCH, "all_but_head")
    records = _transfer_records(caplog)
    assert [r.levelname for r in records] == ["INFO"]
    own = net.state_dict()
    layout = arch_layout("unet", net)
    head = {k for k in own if layout.in_head(k)}
    assert head == {k for k in own if k.startswith("model.2.")} and len(head) < len(own)
    for key, value in own.items():
        if key in head:
            assert torch.equal(value, fresh[key]), key  # the head keeps the target's initialisation
        else:
            assert torch.equal(value, source[key]), key
    line = records[0].getMessage()
    assert f"loaded {len(own) - len(head)}/{len(own)}" in line and "mismatch" not in line
    assert f"skipped by mode {len(head)}" in line


def test_contract_per_mode_requires_the_tensors_the_mode_promises():
    torch.manual_seed(0)
    net = build_network("unet", 1, 2, PATCH, **KW)
    layout = arch_layout("unet", net)
    keys = list(net.state_dict())
    encoder = {k for k in keys if layout.encoder_level(k) is not None}
    head = {k for k in keys if layout.in_head(k)}
    assert set(required_keys(keys, "full", layout)) == set(keys)
    assert set(required_keys(keys, "all_but_head", layout)) == set(required_keys(keys, "frozen_encoder", layout)) \
        == set(keys) - head
    assert set(required_keys(keys, "encoder_only", layout)) == set(required_keys(keys, "decoder_only", layout)) \
        == encoder
    assert set(required_keys(keys, "truncated:1", layout)) == {k for k in keys if layout.encoder_level(k) == 1}
    assert required_keys(keys, "scratch", layout) == []

    state = _shifted(build_network("unet", 1, 2, PATCH, **KW))
    level2 = sorted(k for k in keys if layout.encoder_level(k) == 2)
    partial = {k: v for k, v in state.items() if k not in level2}  # a checkpoint lacking encoder level 2
    init_from_checkpoint(build_network("unet", 1, 2, PATCH, **KW), partial, "truncated:1", layout)  # not required
    for mode in ("encoder_only", "truncated:2", "all_but_head"):
        with pytest.raises(PartialTransferError, match=f"missing from the checkpoint {len(level2)} "
                                                       rf"\({re.escape(level2[0])} \("):
            init_from_checkpoint(build_network("unet", 1, 2, PATCH, **KW), partial, mode, layout, source="p.pt")
    scratch = init_from_checkpoint(net, {}, "scratch", layout)
    assert scratch.loaded == [] and scratch.required == [] and scratch.complete


def test_complete_transfer_with_unknown_checkpoint_keys_loads_but_warns(caplog):
    torch.manual_seed(0)
    state = {**_shifted(build_network("unet", 1, 3, PATCH, **KW)), "aux_head.weight": torch.ones(3, 4)}
    net = build_network("unet", 1, 2, PATCH, **KW)
    with caplog.at_level(logging.INFO, logger="medxfer.transfer"):
        report = init_from_checkpoint(net, state, "all_but_head", "unet", source="multi.pt")
    assert report.missing == [] and report.not_in_network == ["aux_head.weight"]
    assert [r.levelname for r in _transfer_records(caplog)] == ["WARNING"]
    assert "not in network 1 (aux_head.weight)" in caplog.text
    with pytest.raises(PartialTransferError, match="strict transfer all_but_head.*not in network 1"):
        init_from_checkpoint(build_network("unet", 1, 2, PATCH, **KW), state, "all_but_head", "unet", strict=True)


def test_imagenet_encoder_missing_blocks_is_refused(tmp_path):
    from medxfer.networks.effnet_unet import unet_effb0

    torch.manual_seed(0)
    encoder = unet_effb0(in_channels=3, out_channels=1).encoder.state_dict()
    cut = {k: v for k, v in encoder.items() if not k.startswith("_blocks.6.")}  # the deepest stack lost
    path = tmp_path / "effb0_cut.pth"
    torch.save(cut, path)
    with pytest.raises(PartialTransferError, match=re.escape(f"{path}: transfer encoder_only loaded")
                       + r".*missing from the checkpoint \d+ \(encoder\._blocks\.6\."):
        load_encoder_weights(unet_effb0(in_channels=3, out_channels=1), path)


def test_bundle_configs_pass_allow_partial_through(tmp_path):
    from pathlib import Path

    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    _bank(tmp_path, "prostate_e2", build_network("unet", 2, 3, PATCH, **KW), in_channels=2)
    root = Path(__file__).resolve().parents[1] / "bundles" / "msd_seg3d"
    for allow in (False, True):
        parser = ConfigParser()
        parser.read_config([str(root / "configs" / "train.yaml"), str(root / "configs" / "finetune.yaml")])
        parser.update({"bundle_root": str(root), "bank_root": str(tmp_path / "bank"), "bank_entry": "prostate_e2",
                       "in_channels": 1, "out_channels": 2, "roi_size": PATCH, "output_dir": str(tmp_path / f"ft{allow}"),
                       "allow_partial": allow})
        if allow:
            net = parser.get_parsed_content("network_def")
            assert net.state_dict()[FIRST_CONV].shape == (4, 1, 3, 3, 3)
        else:
            with pytest.raises(Exception) as err:  # MONAI wraps it: the cause is ours
                parser.get_parsed_content("network_def")
            cause = err.value
            while cause is not None and not isinstance(cause, PartialTransferError):
                cause = cause.__cause__ or cause.__context__
            assert cause is not None and FIRST_CONV in str(cause)
    for bundle, config in (("seg2d_transfer", "train.yaml"), ("tatl_skin", "train.yaml")):
        text = (root.parent / bundle / "configs" / config).read_text()
        network_def = next(line for line in text.splitlines() if line.startswith("network_def:"))
        assert "\nallow_partial: false" in text and "@allow_partial" in network_def  # passed to the network builder
