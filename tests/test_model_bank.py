"""Model bank: exact round trips, sha256 in the manifest, tamper and pickle refusal, wrapper prefixes."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medxfer.networks.registry import build_network
from medxfer.transfer.bank import MANIFEST, BankEntry, BankError, ModelBank
from medxfer.transfer.weights import CheckpointError, strip_prefixes
from medxfer.transfer.weights import read_checkpoint as read_state_dict

UNET_KWARGS = {"channels": (4, 8, 16), "strides": (2, 2)}
META = {"arch": "unet", "in_channels": 1, "out_channels": 3, "patch_size": [16, 16, 8], "arch_kwargs": UNET_KWARGS}


def _net(seed=0):
    torch.manual_seed(seed)
    return build_network("unet", 1, 3, [16, 16, 16], **UNET_KWARGS)


def _assert_same_state(got, expected):
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def _manifest(root):
    return yaml.safe_load((Path(root) / MANIFEST).read_text())


def _set_manifest_sha(root, name, digest):
    data = _manifest(root)
    for entry in data["entries"]:
        if entry["name"] == name:
            entry["sha256"] = digest
    (Path(root) / MANIFEST).write_text(yaml.safe_dump(data, sort_keys=False))


class _OpensAFile:
    """Unpickling this calls ``open(marker, "w")``, i.e. creates the marker file: code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def bank_with_net(tmp_path):
    net = _net(0)
    bank = ModelBank.open(tmp_path / "bank", create=True, description="test bank")
    bank.add("unet_a", net, source=["Task09_Spleen"], epoch=3, iterations=30, preprocessing={"spacing": [1, 1, 2]},
             notes="tiny", **META)
    return bank, net


def test_add_then_load_state_dict_gives_the_network_state_exactly(bank_with_net):
    bank, net = bank_with_net
    _assert_same_state(bank.load_state_dict("unet_a"), net.state_dict())


def test_manifest_records_the_sha256_of_the_file_bytes_and_a_relative_path(bank_with_net):
    bank, _ = bank_with_net
    [raw] = _manifest(bank.root)["entries"]
    assert raw["checkpoint"] == "checkpoints/unet_a.pt"
    assert not Path(raw["checkpoint"]).is_absolute()
    path = bank.root / raw["checkpoint"]
    assert raw["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert raw["arch_kwargs"] == {"channels": [4, 8, 16], "strides": [2, 2]}  # plain YAML lists
    assert (raw["source"], raw["epoch"], raw["iterations"]) == (["Task09_Spleen"], 3, 30)
    # a plain tensor-only state dict: loadable with weights_only=True
    assert set(torch.load(path, weights_only=True)) == set(_net(0).state_dict())


def test_bank_folder_moved_elsewhere_still_loads(bank_with_net, tmp_path):
    bank, net = bank_with_net
    moved = bank.root.rename(tmp_path / "elsewhere")
    _assert_same_state(ModelBank.open(moved).load_state_dict("unet_a"), net.state_dict())


def test_reopening_the_bank_gives_the_same_entries(bank_with_net):
    bank, net = bank_with_net
    bank.add("unet_b", _net(1), **META)
    again = ModelBank.open(bank.root)
    assert again.names() == ["unet_a", "unet_b"] == bank.names()
    assert [e.to_dict() for e in again] == [e.to_dict() for e in bank]
    assert all(isinstance(e, BankEntry) for e in again)
    assert again.description == "test bank"
    _assert_same_state(again.load_state_dict("unet_a"), net.state_dict())


def test_adding_an_existing_name_needs_overwrite(bank_with_net):
    bank, net = bank_with_net
    other = _net(7)
    old_sha = bank.get("unet_a").sha256
    with pytest.raises(FileExistsError, match="unet_a"):
        bank.add("unet_a", other, **META)
    _assert_same_state(bank.load_state_dict("unet_a"), net.state_dict())  # untouched
    entry = bank.add("unet_a", other, overwrite=True, **META)
    assert entry.sha256 != old_sha
    assert len(ModelBank.open(bank.root)) == 1
    _assert_same_state(ModelBank.open(bank.root).load_state_dict("unet_a"), other.state_dict())


@pytest.mark.parametrize("tamper", ["flip", "append"])
def test_tampered_checkpoint_is_refused_naming_the_file(bank_with_net, tamper):
    bank, _ = bank_with_net
    path = bank.checkpoint_path("unet_a")
    data = bytearray(path.read_bytes())
    if tamper == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    with pytest.raises(BankError) as err:
        bank.load_state_dict("unet_a")
    assert str(path) in str(err.value) and "sha256 mismatch" in str(err.value)
    assert err.value.path == str(path)


def test_pickled_object_payload_really_runs_code_when_loaded_unsafely(tmp_path):
    """Control for the next test: the payload is live, so its absence there means it was not run."""
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(2), "obj": _OpensAFile(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_checkpoint_with_pickled_object_and_matching_sha_is_refused_without_running_it(bank_with_net, tmp_path):
    bank, _ = bank_with_net
    marker = tmp_path / "code_was_executed"
    path = bank.checkpoint_path("unet_a")
    torch.save({"w": torch.zeros(2), "obj": _OpensAFile(marker)}, path)
    _set_manifest_sha(bank.root, "unet_a", hashlib.sha256(path.read_bytes()).hexdigest())
    reopened = ModelBank.open(bank.root)
    assert reopened.verify("unet_a", read_weights=False) == path  # the sha256 check passes ...
    for check in (reopened.load_state_dict, reopened.verify):  # ... and the weights-only read refuses
        with pytest.raises(BankError) as err:
            check("unet_a")
        assert str(path) in str(err.value) and "pickled" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [np.arange(3.0), BankEntry("x", "unet", "c.pt", "0", 1, 2, [16, 16, 16])],
                         ids=["ndarray", "dataclass"])
def test_checkpoint_with_non_tensor_objects_is_refused(tmp_path, payload):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(2), "obj": payload}, path)
    with pytest.raises(CheckpointError, match="pickled") as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_read_state_dict_strips_wrapper_prefixes(tmp_path, prefix):
    state = _net(2).state_dict()
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    _assert_same_state(read_state_dict(path), state)


def test_strip_prefixes_only_strips_leading_wrapper_prefixes():
    t = torch.zeros(1)
    got = strip_prefixes({"module.encoder.module.w": t, "_orig_mod.module._orig_mod.b": t, "my_module.c": t})
    assert list(got) == ["encoder.module.w", "b", "my_module.c"]


def test_add_strips_wrapper_prefixes_from_modules_and_dicts(tmp_path):
    net = _net(3)
    bank = ModelBank.open(tmp_path / "bank", create=True)
    bank.add("dp", torch.nn.DataParallel(net), **META)
    bank.add("compiled", {"_orig_mod." + k: v for k, v in net.state_dict().items()}, **META)
    bank.add("both", {"module._orig_mod." + k: v for k, v in net.state_dict().items()}, **META)
    for name in ("dp", "compiled", "both"):
        raw = torch.load(bank.checkpoint_path(name), weights_only=True)  # the file itself has clean keys
        _assert_same_state(raw, net.state_dict())
        _assert_same_state(bank.load_state_dict(name), net.state_dict())


def test_read_state_dict_accepts_checkpoint_saver_output(tmp_path):
    net = _net(4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "checkpoint_epoch=2.pt"
    torch.save({"network": {"module." + k: v for k, v in net.state_dict().items()}, "optimizer": opt.state_dict(),
                "trainer": {"epoch": 2, "iteration": 20}}, path)
    _assert_same_state(read_state_dict(path), net.state_dict())


def test_missing_bank_is_an_error_naming_the_manifest(tmp_path):
    with pytest.raises(BankError) as err:
        ModelBank.open(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / MANIFEST) in str(err.value)
    assert not (tmp_path / "nowhere").exists()


def test_missing_checkpoint_file_is_an_error_naming_it(bank_with_net, tmp_path):
    bank, _ = bank_with_net
    path = bank.checkpoint_path("unet_a")
    path.unlink()
    with pytest.raises(BankError) as err:
        bank.load_state_dict("unet_a")
    assert str(path) in str(err.value) and "not found" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path / "absent.pt")
    assert str(tmp_path / "absent.pt") in str(err.value)


def test_unknown_entry_name_is_an_error_listing_the_entries(bank_with_net):
    bank, _ = bank_with_net
    with pytest.raises(BankError, match="unet_a"):
        bank.load_state_dict("unet_zz")


def test_invalid_yaml_manifest_is_an_error_naming_it(tmp_path):
    root = tmp_path / "bank"
    root.mkdir()
    (root / MANIFEST).write_text("entries: [ {name: a, arch: unet\n")
    with pytest.raises(BankError) as err:
        ModelBank.open(root)
    assert str(root / MANIFEST) in str(err.value) and "YAML" in str(err.value)


def test_manifest_entry_with_unknown_field_is_an_error_naming_it(bank_with_net):
    bank, _ = bank_with_net
    data = _manifest(bank.root)
    data["entries"][0]["colour"] = "blue"
    bank.manifest.write_text(yaml.safe_dump(data))
    with pytest.raises(BankError) as err:
        ModelBank.open(bank.root)
    assert str(bank.manifest) in str(err.value) and "unet_a" in str(err.value)


def test_non_state_dict_checkpoint_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(garbage)
    assert str(garbage) in str(err.value)


def test_resumed_run_writes_the_bank_entry_the_kill_skipped(tmp_path):
    """Killed after the epoch-2 checkpoint but before its bank entry: the resumed run (state of epoch 2)
    writes the missing entry at start, with the weights it resumed from."""
    from ignite.engine import Engine, Events

    from medxfer.handlers import BankCheckpointer

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        opt.zero_grad()
        net(batch).pow(2).mean().backward()
        opt.step()

    saver = dict(bank_root=tmp_path / "bank", name="lin", network=net, arch="unet", in_channels=3, out_channels=2,
                 patch_size=[4, 4], epochs=[1, 2])
    first = Engine(step)
    BankCheckpointer(**{**saver, "epochs": [1]}, save_final=False).attach(first)  # the epoch-2 entry never came
    first.run([torch.randn(4, 3)], max_epochs=2)
    resumed_weights = {k: v.clone() for k, v in net.state_dict().items()}

    resumed = Engine(step)

    @resumed.on(Events.STARTED)
    def resume(engine):  # what ResumeFromLatest does: the trainer continues after epoch 2
        engine.state.epoch, engine.state.iteration = 2, 2

    handler = BankCheckpointer(**saver)
    handler.attach(resumed)
    resumed.run([torch.randn(4, 3)], max_epochs=3)
    bank = ModelBank.open(tmp_path / "bank")
    assert bank.names() == ["lin_e1", "lin_e2", "lin_e3"] and handler.saved == ["lin_e2", "lin_e3"]
    saved = bank.load_state_dict("lin_e2")
    assert all(torch.equal(saved[k], resumed_weights[k]) for k in saved) and bank.get("lin_e2").epoch == 2
    again = Engine(step)  # resuming when the entry exists writes nothing new (no overwrite error)
    again.on(Events.STARTED)(resume)
    BankCheckpointer(**saver, save_final=False).attach(again)
    again.run([torch.randn(4, 3)], max_epochs=2)
    assert ModelBank.open(tmp_path / "bank").names() == ["lin_e1", "lin_e2", "lin_e3"]
