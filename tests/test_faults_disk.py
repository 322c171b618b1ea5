"""Disk faults (issue 13, item 5): a full disk mid-write leaves no truncated file under a final name,
keeps what the user had, and the command line says so in one line (``medxfer: <path>: ...``).

Most cases patch the writer so that it writes part of its bytes, then raises ``ENOSPC`` (what a
filling disk does); one fills a real 200 KiB tmpfs (needs root to mount; skipped otherwise).
"""

import builtins
import errno
import gc
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import medxfer.atomic
from medxfer.atomic import WriteError
from medxfer.cli import main
from medxfer.data.msd import load_task
from medxfer.data.splits import load_splits, save_splits
from medxfer.data.synth import shapes2d
from medxfer.data.synth.isic import generate_isic
from medxfer.data.synth.msd import generate_msd_task
from medxfer.data.synth.shapes2d import generate_seg2d
from medxfer.jsonfile import write_json
from medxfer.planning.nnunet import _write_new
from medxfer.transfer.bank import ModelBank

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
TINY_MSD = ["--profiles", "spleen", "--num-training", "2", "--num-test", "1", "--shape", "16", "16", "8",
            "--spacing", "6", "6", "10", "--spacing-jitter", "0"]


class _FillingFile:
    """A binary file that takes ``room`` bytes, writes the part that fits, then raises ENOSPC."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            self._f.write(bytes(data[: self._room]))
            self._f.flush()
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(match, room)``: files medxfer.atomic writes whose temporary name contains
    ``match`` get ``room`` bytes, then ENOSPC. Returns the list of temporary paths hit."""
    hits = []

    def arm(match: str = "", room: int = 10):
        def fake_open(file, mode="r", *args, **kwargs):
            f = builtins.open(file, mode, *args, **kwargs)
            if "w" in mode and match in Path(file).name:
                hits.append(Path(file))
                return _FillingFile(f, room)
            return f

        monkeypatch.setattr(medxfer.atomic, "open", fake_open, raising=False)
        return hits

    return arm


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones included) -> sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".part" in p.name or ".old" in p.name)


def _assert_enospc(err, path):
    assert isinstance(err, WriteError) and err.errno == errno.ENOSPC
    assert str(err) == f"{path}: no space left on device (ENOSPC) while writing"


# ----------------------------------------------------------------------------- single files
def test_write_json_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, full_disk):
    path = write_json(tmp_path / "scores.json", {"a": 1.0, "b": float("nan")})
    before = path.read_bytes()
    hits = full_disk("scores", room=5)
    with pytest.raises(WriteError) as info:
        write_json(path, {"a": 2.0, "rows": list(range(1000))})
    _assert_enospc(info.value, path)
    assert hits and not hits[0].exists()                     # the half-written temporary is gone
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["scores.json"]
    full_disk("new", room=0)
    with pytest.raises(WriteError):
        write_json(tmp_path / "new.json", {"x": 1})
    assert not (tmp_path / "new.json").exists()


def test_bank_add_and_save_keep_manifest_and_checkpoints(tmp_path, full_disk):
    bank = ModelBank.open(tmp_path / "bank", create=True, description="test bank")
    first = {"w": torch.arange(64, dtype=torch.float32)}
    bank.add("net_a", first, arch="unet", in_channels=1, out_channels=2, patch_size=[8, 8, 8])
    manifest, ckpt = bank.manifest.read_bytes(), bank.checkpoint_path("net_a").read_bytes()

    full_disk("net_a", room=100)                            # checkpoint of a replacement fails mid-write
    with pytest.raises(WriteError) as info:
        bank.add("net_a", {"w": torch.zeros(4096)}, arch="unet", in_channels=1, out_channels=2,
                 patch_size=[8, 8, 8], overwrite=True)
    _assert_enospc(info.value, bank.checkpoint_path("net_a"))
    assert bank.checkpoint_path("net_a").read_bytes() == ckpt and bank.manifest.read_bytes() == manifest
    assert torch.equal(ModelBank.open(bank.root).load_state_dict("net_a")["w"], first["w"])  # sha256 still matches

    full_disk("bank", room=20)                              # the manifest write fails after the checkpoint
    with pytest.raises(WriteError) as info:
        bank.add("net_b", {"w": torch.ones(3)}, arch="unet", in_channels=1, out_channels=2, patch_size=[8, 8, 8])
    _assert_enospc(info.value, bank.manifest)
    assert bank.manifest.read_bytes() == manifest and yaml.safe_load(manifest)["entries"][0]["name"] == "net_a"
    assert bank.names() == ["net_a"] and ModelBank.open(bank.root).names() == ["net_a"]
    bank.description = "changed"
    with pytest.raises(WriteError):
        bank.save()
    assert bank.manifest.read_bytes() == manifest
    assert not _leftovers(bank.root) and not [p for p in bank.root.rglob(".*")]


def test_plans_and_splits_keep_the_previous_file(tmp_path, full_disk):
    plans = tmp_path / "medxfer_plans.json"
    _write_new(plans, '{"patch_size": [8, 8, 8]}\n', overwrite=False)
    splits_file = save_splits([{"train": ["a", "b"], "val": ["c"]}], tmp_path / "splits.json")
    before = plans.read_bytes(), splits_file.read_bytes()
    full_disk(room=2)
    with pytest.raises(WriteError) as info:
        _write_new(plans, '{"patch_size": [16, 16, 16], "target_spacing": [1, 1, 1]}\n', overwrite=True)
    _assert_enospc(info.value, plans)
    with pytest.raises(WriteError) as info:
        save_splits([{"train": ["c"], "val": ["a", "b"]}], splits_file, overwrite=True)
    _assert_enospc(info.value, splits_file)
    with pytest.raises(WriteError):
        _write_new(tmp_path / "other_plans.json", "{}\n", overwrite=False)
    assert (plans.read_bytes(), splits_file.read_bytes()) == before
    assert load_splits(splits_file) == [{"train": ["a", "b"], "val": ["c"]}]
    assert sorted(os.listdir(tmp_path)) == ["medxfer_plans.json", "splits.json"]


def test_exclusive_write_still_refuses_an_existing_file(tmp_path):
    save_splits([{"train": ["a"], "val": ["b"]}], tmp_path / "s.json")
    with pytest.raises(FileExistsError, match="split file exists"):
        save_splits([{"train": ["b"], "val": ["a"]}], tmp_path / "s.json")
    plans = tmp_path / "p.json"
    _write_new(plans, "{}\n", overwrite=False)
    with pytest.raises(FileExistsError, match="plans exist"):
        _write_new(plans, '{"x": 1}\n', overwrite=False)
    assert plans.read_text() == "{}\n" and sorted(os.listdir(tmp_path)) == ["p.json", "s.json"]


# ----------------------------------------------------------------------------- generators
@pytest.fixture
def nifti_disk_full_after(monkeypatch):
    """``arm(n)``: the MSD generator's ``nib.save`` writes ``n`` files, then half of one and ENOSPC."""
    import nibabel as nib

    real = nib.save

    def arm(n: int):
        calls = []

        def save(img, filename, *args, **kwargs):
            calls.append(filename)
            if len(calls) <= n:
                return real(img, filename, *args, **kwargs)
            real(img, filename, *args, **kwargs)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])        # the truncated file a full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr("medxfer.data.synth.msd.nib.save", save)
        return calls

    return arm


def test_synth_msd_full_disk_leaves_no_task_and_one_line(tmp_path, nifti_disk_full_after, capsys):
    calls = nifti_disk_full_after(3)
    code = main(["synth", "msd", "--out", str(tmp_path / "msd"), *TINY_MSD])
    err = capsys.readouterr().err
    assert code == 1 and len(calls) == 4
    assert err == f"medxfer: {tmp_path / 'msd' / 'Task09_Spleen'}: no space left on device (ENOSPC) while writing\n"
    assert list((tmp_path / "msd").iterdir()) == []     # no task, no hidden temporary


def test_synth_msd_overwrite_failure_keeps_the_existing_task(tmp_path, nifti_disk_full_after, capsys):
    assert main(["synth", "msd", "--out", str(tmp_path), *TINY_MSD, "--seed", "1"]) == 0
    task = tmp_path / "Task09_Spleen"
    before = _snapshot(task)
    nifti_disk_full_after(2)
    code = main(["synth", "msd", "--out", str(tmp_path), *TINY_MSD, "--seed", "2", "--overwrite"])
    assert code == 1 and "no space left on device" in capsys.readouterr().err
    assert _snapshot(task) == before and sorted(os.listdir(tmp_path)) == ["Task09_Spleen"]
    assert len(load_task(task).training) == 2
    # and a successful --overwrite replaces it completely
    nifti_disk_full_after(10**6)
    generate_msd_task(tmp_path, "spleen", num_training=1, num_test=0, shape=(16, 16, 8), spacing=(6, 6, 10),
                      spacing_jitter=0, seed=3, overwrite=True)
    assert len(load_task(task).training) == 1 and sorted(os.listdir(tmp_path)) == ["Task09_Spleen"]


def test_synth_2d_and_isic_failures_leave_previous_sets(tmp_path, monkeypatch):
    out = tmp_path / "seg2d"
    generate_seg2d(out, num_images=3, size=(16, 16), seed=0)
    (out / "notes.txt").write_text("mine")                  # a foreign entry the generator must keep
    before = _snapshot(out)
    real_save, calls = shapes2d._save_png, []

    def failing_save(array, path):
        calls.append(path)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(array, path)

    monkeypatch.setattr(shapes2d, "_save_png", failing_save)
    with pytest.raises(WriteError) as info:
        generate_seg2d(out, num_images=5, size=(16, 16), seed=1, overwrite=True)
    _assert_enospc(info.value, out)
    assert _snapshot(out) == before and sorted(os.listdir(out)) == sorted(["README.txt", "images", "labels.json",
                                                                          "masks", "notes.txt"])
    monkeypatch.setattr(shapes2d, "_save_png", real_save)
    generate_seg2d(out, num_images=2, size=(16, 16), seed=1, overwrite=True)   # success: replaced whole
    assert len(os.listdir(out / "images")) == 2 and (out / "notes.txt").read_text() == "mine"

    from PIL import Image

    real_image_save, saved = Image.Image.save, []

    def image_save(self, fp, *args, **kwargs):
        saved.append(fp)
        if len(saved) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_image_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", image_save)
    with pytest.raises(WriteError) as info:
        generate_isic(tmp_path / "isic", year=2017, num_images=3, size=(32, 32))
    _assert_enospc(info.value, tmp_path / "isic")
    assert not (tmp_path / "isic").exists()
    (tmp_path / "isic").mkdir()
    saved.clear()
    with pytest.raises(OSError):
        generate_isic(tmp_path / "isic", year=2017, num_images=3, size=(32, 32))
    assert os.listdir(tmp_path / "isic") == []


# ----------------------------------------------------------------------------- command line
def test_cli_reports_os_errors_in_one_line(tmp_path, monkeypatch, capsys):
    import medxfer.cli as cli

    def raiser(err):
        def run(*args, **kwargs):
            raise err
        return run

    def wrapped(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "a.bin"))
        except OSError as e:
            raise RuntimeError("writer failed") from e

    argv = ["synth", "seg2d", "--out", str(tmp_path / "x")]
    cases = [(PermissionError(errno.EACCES, "Permission denied", "/data/x.png"),
              "medxfer: /data/x.png: permission denied (EACCES)\n"),
             (WriteError(tmp_path / "m.pt", ENOSPC), f"medxfer: {tmp_path / 'm.pt'}: no space left on device (ENOSPC) while writing\n"),
             (OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/a", None, "/ro/b"),
              "medxfer: /ro/a -> /ro/b: read-only file system (EROFS)\n")]
    for err, line in cases:
        monkeypatch.setattr(cli, "generate_seg2d", raiser(err))
        assert main(argv) == 1
        assert capsys.readouterr().err == line
    monkeypatch.setattr(cli, "generate_seg2d", wrapped)            # wrapped by a library: still one line
    assert main(argv) == 1
    assert capsys.readouterr().err == f"medxfer: {tmp_path / 'a.bin'}: no space left on device (ENOSPC)\n"
    monkeypatch.setattr(cli, "generate_seg2d", raiser(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):                # not an OS error: the traceback stays
        main(argv)
    monkeypatch.setenv("MEDXFER_DEBUG", "1")
    monkeypatch.setattr(cli, "generate_seg2d", raiser(PermissionError(errno.EACCES, "Permission denied", "/d")))
    with pytest.raises(PermissionError):
        main(argv)


def test_cli_check_data_json_write_fails_in_one_line(tmp_path, full_disk, capsys):
    generate_seg2d(tmp_path / "data", num_images=2, size=(16, 16))
    report = tmp_path / "report.json"
    report.write_text("[]\n")
    full_disk("report", room=4)
    assert main(["check-data", str(tmp_path / "data"), "--quiet", "--json", str(report)]) == 1
    assert capsys.readouterr().err == f"medxfer: {report}: no space left on device (ENOSPC) while writing\n"
    assert report.read_text() == "[]\n"


# ----------------------------------------------------------------------------- a real full disk
@pytest.fixture
def small_fs(tmp_path):
    """A 200 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        gc.collect()  # files a failed writer left open are held by the exception's frames until then
        done = subprocess.run(["umount", str(mnt)], capture_output=True)
        assert done.returncode == 0, f"umount {mnt}: {done.stderr.decode().strip()}"


def test_synth_msd_on_a_really_full_disk(small_fs, capsys):
    # a full-size spleen task (~1 MB of gzipped NIfTI) cannot fit into 200 KiB
    code = main(["synth", "msd", "--out", str(small_fs / "msd"), "--profiles", "spleen", "--num-training", "6"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"medxfer: {small_fs / 'msd'}")
    assert "no space left on device (ENOSPC)" in err
    assert list((small_fs / "msd").iterdir()) == []       # nothing under a final name, no temporary left
    # a task that fits is written completely; a bigger --overwrite that does not fit keeps it intact
    assert main(["synth", "msd", "--out", str(small_fs / "msd"), *TINY_MSD]) == 0
    task = small_fs / "msd" / "Task09_Spleen"
    before = _snapshot(task)
    code = main(["synth", "msd", "--out", str(small_fs / "msd"), "--profiles", "spleen", "--overwrite"])
    assert code == 1 and "no space left on device" in capsys.readouterr().err
    assert _snapshot(task) == before and os.listdir(small_fs / "msd") == ["Task09_Spleen"]
    for record in load_task(task).training:                # every file under a final name is complete
        import nibabel as nib

        assert np.asarray(nib.load(record["image"]).dataobj).shape == (16, 16, 8)
