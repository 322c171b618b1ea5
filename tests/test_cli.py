"""The `medxfer` command line, including the README's main job (`medxfer demo`)."""

import json

import pytest

from medxfer.cli import main
from medxfer.data.msd import load_task
from medxfer.data.splits import load_splits


def test_synth_msd_then_split_then_check(tmp_path, capsys):
    assert main(["synth", "msd", "--out", str(tmp_path), "--profiles", "spleen", "--num-training", "5",
                 "--num-test", "1", "--shape", "32", "32", "12", "--spacing", "1.5", "1.5", "4", "--spacing-jitter", "0"]) == 0
    folder = tmp_path / "Task09_Spleen"
    assert len(load_task(folder).training) == 5
    assert main(["synth", "msd", "--out", str(tmp_path), "--profiles", "spleen"]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert main(["split", str(folder), "--out", str(tmp_path / "splits.json"), "--folds", "5", "--seed", "1"]) == 0
    splits = load_splits(tmp_path / "splits.json")
    assert len(splits) == 5 and all(len(f["val"]) == 1 for f in splits)
    assert main(["check-data", str(folder), "--quiet", "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report[0]["kind"] == "msd" and report[0]["num_cases"] == 6 and report[0]["problems"] == []


def test_unknown_profile_is_a_clear_error(tmp_path, capsys):
    assert main(["synth", "msd", "--out", str(tmp_path), "--profiles", "kidney"]) == 2
    assert "unknown profile" in capsys.readouterr().err


def test_synth_isic_2017_layout(tmp_path):
    assert main(["synth", "isic", "--out", str(tmp_path), "--year", "2017", "--num-images", "4", "--size", "40", "48"]) == 0
    assert len(list((tmp_path / "ISIC-2017_Training_Part2_GroundTruth").glob("ISIC_*_pigment_network.png"))) == 4


def test_demo_writes_valid_data_splits_summary_and_preview(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--study", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["msd"]) == 7 and len(summary["isic"]) == 2 and summary["problems"] == 0
    prevalence = summary["isic"][0]["attribute_prevalence"]
    assert abs(prevalence["pigment_network"] - 0.5867) < 0.05
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "splits").glob("*.json"))) == 9
    assert json.loads((out / "check_report.json").read_text())
    # running again into its own folder is fine and keeps the generated data (a resumed demo);
    # a folder with someone else's files is refused
    image = next((out / "data" / "msd").glob("Task*/imagesTr/*.nii.gz"))
    stamp = image.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--study", "none"]) == 0
    assert "kept:" in capsys.readouterr().out and image.stat().st_mtime_ns == stamp
    (out / "data" / "demo_data.json").write_text('{"seed": 1}')  # other settings: generated again
    assert main(["demo", "--out", str(out), "--study", "none"]) == 0
    assert image.stat().st_mtime_ns != stamp
    other = tmp_path / "mine"
    other.mkdir()
    (other / "results.csv").write_text("precious")
    assert main(["demo", "--out", str(other), "--study", "none"]) == 1
    assert "not made by `medxfer demo`" in capsys.readouterr().out
    assert (other / "results.csv").read_text() == "precious"


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("synth", "check-data", "split", "demo"):
        assert cmd in out
