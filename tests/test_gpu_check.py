"""``scripts/gpu_check.py`` end to end on the CPU at its smallest sizes (``run --device cpu --tiny``,
what ``make gpu-check`` runs), so a broken script shows here and not first on a lent GPU machine;
plus its device-side pieces that need no GPU (the missing-wheels report, the SimpleITK stand-in)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from medxfer.transfer.bank import ModelBank
from medxfer.transferability.score import DEFAULT_ESTIMATORS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
#: the sections and the number each reports, as the bundle's model card documents them
SECTIONS = {
    "msd_seg3d_train_unet": "s_per_iteration", "msd_seg3d_train_swinunetr": "s_per_iteration",
    "msd_seg3d_inference": "s_per_volume", "msd_seg3d_ddp_torchrun": "s_per_iteration",
    "score_bank": "s_per_model_case", "tatl_train": "s_per_iteration", "seg2d_train": "s_per_iteration",
}


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load_script()


@pytest.fixture(scope="module")
def tiny_run(gpu_check, tmp_path_factory):
    """``run --device cpu --tiny`` once: ``(exit status, JSON printed on stdout, result file, out folder)``."""
    out = tmp_path_factory.mktemp("gpu_check")
    capture = out / "stdout.json"
    saved = sys.stdout
    with capture.open("w") as f:  # the script prints the JSON alone on stdout (fd 1 goes to stderr meanwhile)
        sys.stdout = f
        try:
            status = gpu_check.main(["run", "--device", "cpu", "--tiny", "--out", str(out / "run"),
                                     "--result", str(out / "result.json")])
        finally:
            sys.stdout = saved
    return status, json.loads(capture.read_text()), json.loads((out / "result.json").read_text()), out / "run"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_tiny_cpu_run_reports_every_section_on_both_roles(tiny_run):
    status, report, saved, _ = tiny_run
    assert report["errors"] == {} and report["ok"] is True and status == 0
    assert saved == report  # the file written after every section ends as the printed JSON
    assert report["device"] == "cpu" and report["profile"] == "tiny"
    assert set(report["results"]) == set(SECTIONS)
    for name, metric in SECTIONS.items():
        entry = report["results"][name]
        assert set(entry) == {"device", "cpu", "cpu_over_device"}, name
        for role in ("device", "cpu"):
            assert _positive(entry[role][metric]), (name, role, entry[role])
            assert _positive(entry[role]["wall_s"]), (name, role)
            assert "peak_gpu_mib" not in entry[role]  # only measured on CUDA
        assert entry["cpu_over_device"] == pytest.approx(entry["cpu"][metric] / entry["device"][metric])
    assert _positive(report["wall_s"]) and report["env"]["cuda_available"] is torch.cuda.is_available()


def test_iteration_counts_match_the_runs_own_checkpoints(tiny_run):
    _, report, _, out = tiny_run
    work = out / "work" / "device"
    res = report["results"]
    for name, folder, splits in (("msd_seg3d_train_unet", "train_unet", "splits_Task03_Liver.json"),
                                 ("msd_seg3d_ddp_torchrun", "ddp", "splits.json")):
        n_train = len(json.loads((work / folder / splits).read_text())[0]["train"])  # fold 0, batch size 1
        ckpt = torch.load(work / folder / f"checkpoint_epoch={res[name]['device']['epochs']}.pt", weights_only=True)
        assert ckpt["trainer"]["iteration"] == n_train * res[name]["device"]["epochs"]
        assert res[name]["device"]["iterations"] == max(1, ckpt["trainer"]["iteration"] - 1)  # first one: warm-up
    assert res["msd_seg3d_ddp_torchrun"]["device"]["backend"] == "gloo"


def test_scoring_used_every_estimator_on_every_bank_model(tiny_run):
    _, report, _, out = tiny_run
    score = report["results"]["score_bank"]["device"]
    bank = ModelBank.open(out / "work" / "device" / "bank")
    assert sorted(bank.get(n).arch for n in bank.names()) == ["swinunetr", "unet"]
    assert score["models"] == len(bank.names()) and score["estimators"] == list(DEFAULT_ESTIMATORS)
    rows = json.loads((out / "work" / "device" / "scores" / "scores.json").read_text())["rows"]
    assert {r["model"] for r in rows} == set(bank.names())
    assert all(math.isfinite(r[e]) for r in rows for e in DEFAULT_ESTIMATORS) and score["non_finite"] == []
    inference = report["results"]["msd_seg3d_inference"]["device"]
    assert inference["volumes"] == len(list((out / "data" / "msd" / "Task03_Liver" / "imagesTs").glob("*.nii.gz")))


def test_device_without_wheels_fails_with_the_prepare_hint(gpu_check, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert gpu_check.main(["device", "--dir", str(tmp_path / "empty")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and "make gpu-check-prepare" in report["errors"]["install"]


def test_simpleitk_stand_in_imports_and_refuses_any_use(gpu_check, tmp_path):
    (tmp_path / "SimpleITK").mkdir()
    (tmp_path / "SimpleITK" / "__init__.py").write_text(gpu_check.STUB_SOURCE.format(name="SimpleITK", why="test"))
    spec = importlib.util.spec_from_file_location("stub_sitk", tmp_path / "SimpleITK" / "__init__.py")
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    with pytest.raises(AttributeError, match="SimpleITK.ReadImage was used"):
        stub.ReadImage
    assert not hasattr(stub, "__wrapped__")  # dunder look-ups stay plain AttributeErrors


def test_data_folder_of_something_else_is_never_deleted(gpu_check, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not data of this script"):
        gpu_check.ensure_data(tmp_path, "tiny")
    assert (tmp_path / "mine.txt").read_text() == "keep"
