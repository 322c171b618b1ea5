"""The "Reproducing the paper" commands of the model cards run on generated data (issue 17).

Each card (``bundles/tatl_skin``, ``bundles/seg2d_transfer``) lists, in one fenced ``bash`` block of
its section "Reproducing the paper", one command per reproducible table or figure, each after a
comment ``# [ID] ...`` that the section's table names. The commands are read from the cards
themselves (the card test's parser, :func:`test_model_cards.document_commands`), so card and test
cannot drift: every ID of the card's table must have a command and every command an entry in
``EXPECT`` below (what its output must hold), and the other way round.

A command is run as written except for

* the data paths (``/data/...`` placeholders of the card) -> generated data: ``medxfer synth isic``
  (ISIC 2018 and 2017), ``synth classes`` (an ImageNet stand-in named ``train``, the COVID-19 CXR
  folders, the CheXpert images), ``synth seg2d`` (COVID-QU); the weights files -> state dicts of
  randomly initialised MONAI EfficientNet-b0 / DenseNet121 (so the loading path runs);
* size overrides (replacing the command's value where it sets one, else appended): 1 epoch (2-3
  for pretraining), 32 px (64 for truncated transfer), a 2-fold (TATL) or 3-fold (thesis) split, batch 4-8, one U-shape TATL
  network per stage unless the command chooses its shapes, and one repeat for truncated transfer;
* thesis commands use a narrow ``unet2d`` (8..128 channels) instead of ``resnet50_attention_unet``
  and the last tiny checkpoint (``_e2``) instead of ``_e300`` (names in arguments and output folders
  alike, so the chain pretrain -> train -> evaluate -> dice.csv -> selection still lines up).

Grouped (to keep the file under two minutes): commands that differ from a command that runs only in
data or one setting are **resolved, not run**: their configs and overrides are parsed with MONAI's
``ConfigParser`` and the resolved settings and output folder are checked against ``EXPECT``. Grouped
this way: ``T3-no-imagenet`` (with ``T3-stages123``: only the weights differ), ``T4-stage3``,
``T4-stages23``, ``T4-stages13``, ``T4-no-imagenet`` (with their ``T3-*`` twins: only the data
differ; ``T4-stages123`` runs, on ISIC 2017), ``T5-offset`` (with ``T4-stages123``: the offset),
``T6-u`` (with ``T3-stages123``, which the size overrides reduce to the U shape), ``T8-nf-link``
(with ``T8-nf-u`` and ``T6-link``), ``T8-imagenet-u``, ``T8-imagenet-link`` (with ``T3-stages13``),
``F3-tl`` (with ``F7-covid``: the level) and ``F5-chexpert`` (with ``F4-chexpert``: the level).
Every other command runs, in card order.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from test_model_cards import _in_process, document_commands

REPO = Path(__file__).resolve().parents[1]
CARDS = {"tatl_skin": REPO / "bundles/tatl_skin/docs/README.md",
         "seg2d_transfer": REPO / "bundles/seg2d_transfer/docs/README.md"}
SECTION = "## Reproducing the paper"
ID_LINE = re.compile(r"^#\s*\[(?P<id>[A-Za-z0-9][A-Za-z0-9.\-]*)\]\s")
TABLE_ID = re.compile(r"`((?:T\d|F\d|P-)[A-Za-z0-9.\-]*)`")  # the IDs the tables name

S3, S23, S13, S123 = [3], [2, 3], [1, 3], [1, 2, 3]
U, L = ["unet_effb0"], ["linknet_effb0"]
#: ID -> what its run must show. TATL: cv_scores.json fields (``settings``: tatl_run.json's);
#: ``resolve``: grouped (see the module docstring), checked from the parsed config only.
EXPECT = {
    "tatl_skin": {
        "T3-stage3": dict(stages=S3, imagenet=True, year=2018),
        "T3-stages23": dict(stages=S23, imagenet=True, year=2018),
        "T3-stages13": dict(stages=S13, imagenet=True, year=2018),
        "T3-stages123": dict(stages=S123, imagenet=True, year=2018),
        "T3-no-imagenet": dict(stages=S123, imagenet=False, year=2018, resolve=True),
        "T4-stage3": dict(stages=S3, imagenet=True, year=2017, resolve=True),
        "T4-stages23": dict(stages=S23, imagenet=True, year=2017, resolve=True),
        "T4-stages13": dict(stages=S13, imagenet=True, year=2017, resolve=True),
        "T4-stages123": dict(stages=S123, imagenet=True, year=2017),
        "T4-no-imagenet": dict(stages=S123, imagenet=False, year=2017, resolve=True),
        "T5-offset": dict(stages=S123, imagenet=True, year=2017, offset=20, resolve=True),
        "T6-u": dict(stages=S123, imagenet=True, year=2018, arches=U, resolve=True),
        "T6-link": dict(stages=S123, imagenet=True, year=2018, arches=L, tatl_mode="freeze"),
        "T7": dict(),
        "T8-nf-u": dict(stages=S123, imagenet=True, year=2018, arches=U, tatl_mode="non_freeze"),
        "T8-nf-link": dict(stages=S123, imagenet=True, year=2018, arches=L, tatl_mode="non_freeze", resolve=True),
        "T8-imagenet-u": dict(stages=S13, imagenet=True, year=2018, arches=U, resolve=True),
        "T8-imagenet-link": dict(stages=S13, imagenet=True, year=2018, arches=L, resolve=True),
        "F8-9": dict(),
    },
    "seg2d_transfer": {
        "P-simple": dict(), "T2.4-params": dict(), "T2.6-full": dict(), "T2.6-decoder": dict(),
        "T2.6-scratch": dict(), "T2.6-eval": dict(), "T4.1-dice": dict(), "T4.1-offline": dict(),
        "T4.1-offline-decoder": dict(), "T4.1-online": dict(), "T4.2-l2": dict(distance="l2"),
        "T4.2-pearson": dict(distance="inverse_pearson"), "T4.2-margin": dict(margin=0.25),
        "T4.2-pooled": dict(pooled=True),
        "F7-covid": dict(arch="densenet121", level="Dens-T1", weights=True, task="multiclass"),
        "F3-tl": dict(arch="densenet121", level="Dens-F", weights=True, task="multiclass", resolve=True),
        "F3-ri": dict(arch="densenet121", level="Dens-F", weights=False, task="multiclass"),
        "F4-chexpert": dict(arch="densenet121", level="Dens-F", weights=True, task="multilabel"),
        "F5-chexpert": dict(arch="densenet121", level="Dens-T3", weights=True, task="multilabel", resolve=True),
    },
}
TINY_TATL = {"--n_folds": "2", "--folds": "[0]", "--working_size": "[32,32]", "--max_epochs": "1",
             "--batch_size": "4", "--tune_fraction": "0.25", "--device": "cpu"}
NARROW = "{'channels': [8, 16, 32, 64, 128]}"
#: Table 7's and Table 2.4's numbers as the cards print them
TATL_COUNTS = {"unet_effb0/paper": 7_527_861, "unet_effb0/linknet": 7_060_277,
               "linknet_effb0/paper": 5_803_893, "linknet_effb0/linknet": 5_395_469}
#: the CSV columns of the published CheXpert train.csv after its 5 leading ones
CHEXPERT_FINDINGS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                     "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                     "Fracture", "Support Devices"]
THESIS_ENCODERS = {"unet2d": 19.9e6, "resnet50_attention_unet": 22.8e6, "swin_unet": 21.2e6}


# --- reading the cards ---------------------------------------------------------------------------

def section_commands(card: Path) -> tuple[list[tuple[str, object]], set[str]]:
    """``[(ID, Command)]`` of the card's "Reproducing the paper" block, and the IDs its tables name."""
    text = card.read_text()
    assert SECTION in text, f"{card}: no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    ids_at = {i + 1: m.group("id") for i, line in enumerate(lines) if (m := ID_LINE.match(line.strip()))
              and not line.strip().startswith("# [not run")}
    out = []
    for command in document_commands(section):
        before = [n for n in ids_at if n < command.line]
        assert before, f"{card}: command at section line {command.line} has no '# [ID]' comment"
        out.append((ids_at[max(before)], command))
        assert command.skip, f"{card}: [{out[-1][0]}] must be marked '# [not run by the card test: ...]'"
    table = {m for line in lines if line.startswith("|") for m in TABLE_ID.findall(line)}
    return out, table


@pytest.mark.parametrize("bundle", list(CARDS))
def test_card_ids_commands_and_expectations_agree(bundle):
    commands, table = section_commands(CARDS[bundle])
    ids = [i for i, _ in commands]
    assert len(ids) == len(set(ids)), f"{bundle}: an ID has two commands"
    assert set(ids) == set(EXPECT[bundle]), f"{bundle}: card {sorted(set(ids) ^ set(EXPECT[bundle]))} vs EXPECT"
    assert table <= set(ids) and set(ids) <= table | {"T2.6-eval"}, \
        f"{bundle}: table names {sorted(table - set(ids))}, commands not in the table {sorted(set(ids) - table)}"
    for i, c in commands:
        assert c.argv[0] == "python", f"[{i}] {c.text[:60]}"
        assert c.produces or c.argv[1] == "-c", f"[{i}] lists no output file (# -> ...)"


# --- generated data and argument rewriting -------------------------------------------------------

def _set(argv: list[str], key: str, value: str) -> None:
    if key in argv:
        argv[argv.index(key) + 1] = value
    else:
        argv += [key, value]


def _paths(argv: list[str], mapping: dict[str, str]) -> list[str]:
    keys = sorted(mapping, key=len, reverse=True)
    out = []
    for token in argv:
        for k in keys:
            if token == k or token.startswith(k + "/"):
                token = mapping[k] + token[len(k):]
                break
        out.append(token)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Every generated data set the commands read, and stand-in weights files."""
    from monai.networks.nets import DenseNet121, EfficientNetBN

    from medxfer.data.synth.isic import generate_isic
    from medxfer.data.synth.shapes2d import generate_classification_folder, generate_seg2d

    root = tmp_path_factory.mktemp("paper_data")
    d = {"/data/ISIC2018": str(generate_isic(root / "isic2018", year=2018, num_images=8, size=(48, 64), seed=0)),
         "/data/ISIC2017": str(generate_isic(root / "isic2017", year=2017, num_images=8, size=(48, 64), seed=0))}
    torch.manual_seed(0)
    torch.save(EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3,
                              num_classes=1000).state_dict(), root / "effb0.pth")
    torch.save(DenseNet121(spatial_dims=2, in_channels=3, out_channels=1000).state_dict(), root / "densenet121.pth")
    d["/data/efficientnet-b0-355c32eb.pth"] = str(root / "effb0.pth")
    d["/data/densenet121.pth"] = str(root / "densenet121.pth")
    d["/data/imagenet/train"] = str(generate_classification_folder(root / "imagenet" / "train", num_classes=4,
                                                                   images_per_class=8, size=32, seed=0))
    d["/data/covid_qu"] = str(generate_seg2d(root / "covid_qu", num_images=12, size=(40, 48), seed=0))
    d["/data/covid_cxr"] = str(generate_classification_folder(root / "covid_cxr", num_classes=2,
                                                              images_per_class=10, size=32, seed=1))
    d["/data/covid_cxr_test"] = str(generate_classification_folder(root / "covid_cxr_test", num_classes=2,
                                                                   images_per_class=6, size=32, seed=2))
    # CheXpert as published: <root>/CheXpert-v1.0-small/train.csv, Path relative to <root>
    chex = root / "chexpert"
    images = generate_classification_folder(chex / "CheXpert-v1.0-small" / "train", num_classes=2,
                                            images_per_class=16, size=32, seed=3)
    with open(chex / "CheXpert-v1.0-small" / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS])
        for k, p in enumerate(sorted(images.rglob("*.png"))):  # positive, uncertain (U-Ones: 1), negative, blank
            w.writerow([p.relative_to(chex).as_posix(), "Female", "60", "Frontal", "AP",
                        *[["1.0", "-1.0", "0.0", ""][(k + j // 7) % 4] for j in range(len(CHEXPERT_FINDINGS))]])
    d["/data/CheXpert-v1.0-small/train.csv"] = str(chex / "CheXpert-v1.0-small" / "train.csv")
    d["/data"] = str(chex)
    return d


def tiny_argv(bundle: str, argv: list[str], data: dict) -> list[str]:
    argv = _paths(list(argv), data)
    if argv[1] == "-c":
        return argv
    config = argv[argv.index("--config_file") + 1]
    if bundle == "tatl_skin":
        if "inference.yaml" in config:  # the trained run's settings apply
            _set(argv, "--device", "cpu")
            return argv
        for k, v in TINY_TATL.items():
            _set(argv, k, v)
        if "--arches" not in argv:
            _set(argv, "--arches", "['unet_effb0']")
        return argv
    if "truncated" in config:
        # 64 px: the full DenseNet121 ends at 2x2 (at 32 px 1x1, which batch norm rejects for a batch of one)
        for k, v in {"--image_size": "64", "--max_epochs": "1", "--batch_size": "8", "--val_fraction": "0.25",
                     "--repeats": "1", "--device": "cpu"}.items():
            _set(argv, k, v)
        if "--test_root" not in argv:
            _set(argv, "--test_fraction", "0.25")
        return argv
    # thesis: narrow unet2d, the tiny bank's last checkpoint
    argv = [a.replace("resnet50_attention_unet", "unet2d").replace("_e300", "_e2") for a in argv]
    if "--arch" in argv:
        _set(argv, "--arch_kwargs", NARROW)
    _set(argv, "--device", "cpu")
    if "pretrain_encoder.yaml" in config:
        online = "online_selection" in config
        _set(argv, "--image_size", "32")
        _set(argv, "--max_epochs", "3" if online else "2")
        _set(argv, "--bank_epochs", "[1, 2, 3]" if online else "[1, 2]")
        _set(argv, "--batch_size", "8")
        if online:
            _set(argv, "--target_n_folds", "3")
    elif "train.yaml" in config:
        for k, v in {"--image_size": "32", "--max_epochs": "1", "--batch_size": "4", "--n_folds": "3"}.items():
            _set(argv, k, v)
    elif "select_checkpoint.yaml" in config:
        _set(argv, "--image_size", "32")
        _set(argv, "--n_folds", "3")
    return argv


# --- running and checking ------------------------------------------------------------------------

def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _run(argv: list[str], cwd: Path, monkeypatch) -> str:
    """A command in this process (``python -m``: as the card test runs it; ``python -c``: the code
    executed here); returns what it printed."""
    if argv[1] == "-c":
        buffer = io.StringIO()
        monkeypatch.chdir(cwd)
        with contextlib.redirect_stdout(buffer):
            exec(compile(argv[2], "<card>", "exec"), {"__name__": "__main__"})
        return buffer.getvalue()
    assert _in_process(argv, cwd, monkeypatch) == 0, " ".join(argv)
    return ""


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def resolved(argv: list[str], cwd: Path, keys: list[str]) -> dict:
    """The config of a ``python -m monai.bundle run`` command with its overrides, parsed (not run)."""
    from monai.bundle import ConfigParser

    args = argv[argv.index("run") + 1:]
    options = {args[i][2:]: _literal(args[i + 1]) for i in range(0, len(args), 2)}
    files = options.pop("config_file")
    files = [files] if isinstance(files, str) else files
    parser = ConfigParser()
    parser.read_config([str(cwd / f) for f in files])
    parser.update(options)
    with contextlib.chdir(cwd):
        return {k: parser.get_parsed_content(k) for k in keys}


def check_tatl(name: str, expect: dict, argv: list[str], produced: list[str], cwd: Path, data: dict) -> None:
    from medxfer.data.isic import ISIC_LAYOUTS

    out = Path(produced[0]).parent
    if expect.get("resolve"):
        got = resolved(argv, cwd, ["settings", "output_dir", "data_root"])
        s = got["settings"]
        assert (cwd / got["output_dir"]).resolve() == (cwd / out).resolve(), f"[{name}] output folder"
        assert list(s.stages) == expect["stages"] and (s.imagenet_weights is not None) == expect["imagenet"], name
        assert data[f"/data/ISIC{expect['year']}"] == got["data_root"], f"[{name}] data"
        assert list(s.arches) == expect.get("arches", U), name  # the test's U-only override unless chosen
        assert s.tatl_mode == expect.get("tatl_mode", "freeze") and s.offset == expect.get("offset", 40), name
        return
    report = json.loads((cwd / out / "cv_scores.json").read_text())
    assert report["stages"] == expect["stages"] and report["imagenet"] == expect["imagenet"], name
    assert report["year"] == expect["year"] and report["arches"] == expect.get("arches", U), name
    assert report["tatl_mode"] == expect.get("tatl_mode", "freeze"), name
    for attribute in ISIC_LAYOUTS[expect["year"]].attributes:   # the table's columns
        row = report["summary"][attribute]
        assert all(_finite(row[k]) for k in ("jaccard_mean", "jaccard_std", "dice_mean", "dice_std")), (name, row)
        assert 0 <= row["jaccard_mean"] <= row["dice_mean"] <= 1, (name, attribute, row)
    assert _finite(report["summary"]["mean"]["jaccard_mean"]) and _finite(report["summary"]["mean"]["dice_mean"])


def test_tatl_tables_on_generated_data(data, tmp_path, monkeypatch):
    cwd = tmp_path / "tatl_skin"
    shutil.copytree(REPO / "bundles/tatl_skin/configs", cwd / "configs")
    card = CARDS["tatl_skin"].read_text()
    for name, command in section_commands(CARDS["tatl_skin"])[0]:
        expect, argv = EXPECT["tatl_skin"][name], tiny_argv("tatl_skin", command.argv, data)
        if name == "T7":
            counts = ast.literal_eval(_run(argv, cwd, monkeypatch).strip())
            assert {k: v["total"] for k, v in counts.items()} == TATL_COUNTS
            assert all(f"{n:,}" in card for n in TATL_COUNTS.values()), "the card's Table 7 numbers are stale"
            continue
        if name == "F8-9":
            _run(argv, cwd, monkeypatch)
            predictions = json.loads((cwd / command.produces[0]).read_text())
            images = sorted(Path(data["/data/ISIC2018"], "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))
            assert len(images) == 8 and len(predictions) > 0
            for image in images:
                assert (cwd / "runs/paper_pred" / f"{image.stem}_union.png").is_file(), image.stem
                assert (cwd / "runs/paper_pred" / f"{image.stem}_overlay.png").is_file(), image.stem
            continue
        if not expect.get("resolve"):
            _run(argv, cwd, monkeypatch)
        check_tatl(name, expect, argv, command.produces, cwd, data)


def _scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {r["model"]: float(r["robustness"]) for r in csv.DictReader(f)}


def test_thesis_and_truncated_transfer_tables_on_generated_data(data, tmp_path, monkeypatch):
    cwd = tmp_path / "seg2d_transfer"
    shutil.copytree(REPO / "bundles/seg2d_transfer/configs", cwd / "configs")
    expects = EXPECT["seg2d_transfer"]
    commands = dict(section_commands(CARDS["seg2d_transfer"])[0])
    for name, command in commands.items():
        expect, argv = expects[name], tiny_argv("seg2d_transfer", command.argv, data)
        produced = [cwd / p.replace("resnet50_attention_unet", "unet2d").replace("_e300", "_e2")
                    for p in command.produces]
        if expect.get("resolve"):
            got = resolved(argv, cwd, ["arch", "level", "weights_file", "task", "output_dir", "repeats"])
            assert (got["arch"], got["level"], got["task"]) == (expect["arch"], expect["level"], expect["task"]), name
            assert (got["weights_file"] is not None) == expect["weights"] and got["repeats"] == 1, name
            assert (cwd / got["output_dir"]).resolve() == produced[0].parent.resolve(), name
            continue
        if name == "T2.4-params":
            counts = ast.literal_eval(_run(argv, cwd, monkeypatch).strip())
            for arch, ref in THESIS_ENCODERS.items():  # thesis Table 2.4, within 10 %
                assert abs(counts[arch] - ref) <= 0.1 * ref, (arch, counts[arch], ref)
            continue
        if name == "T4.1-dice":
            # every initialisation of the tiny bank, as "the same command for every checkpoint": e1 too
            full = commands["T2.6-full"].argv
            e1 = [a.replace("_e300", "_e1") for a in full]
            _run(tiny_argv("seg2d_transfer", e1, data), cwd, monkeypatch)
            for run_dir in sorted((cwd / "runs/covid_full").glob("*/seed_0")):
                if not (run_dir / "evaluation/metrics.json").exists():
                    ev = [a if a != commands["T2.6-eval"].argv[-1] else str(run_dir.relative_to(cwd))
                          for a in commands["T2.6-eval"].argv]
                    _run(tiny_argv("seg2d_transfer", ev, data), cwd, monkeypatch)
        _run(argv, cwd, monkeypatch)
        for p in produced:
            assert p.exists() or list(p.parent.glob(p.name)), f"[{name}] did not produce {p}"
        if name == "T2.6-eval":
            summary = json.loads(produced[0].read_text())["summary"]
            assert [k for k in summary if k.startswith("dice_")] and all(
                _finite(v["mean"]) for k, v in summary.items() if k.startswith("dice_")), summary
        if name == "T4.1-dice":
            with open(produced[0], newline="") as f:
                rows = {r["model"]: float(r["dice"]) for r in csv.DictReader(f)}
            assert set(rows) == {"unet2d_random_init", "unet2d_train_e1", "unet2d_train_e2"}, rows
            for model, value in rows.items():  # the mean Dice of that run's metrics.json
                summary = json.loads((cwd / "runs/covid_full" / model / "seed_0/evaluation/metrics.json")
                                     .read_text())["summary"]
                dice = [v["mean"] for k, v in summary.items() if k.startswith("dice_")]
                assert value == pytest.approx(sum(dice) / len(dice))
        if name.startswith("T4.1-offline") or name.startswith("T4.2"):
            selection = json.loads(produced[0].read_text())
            scores = _scores(produced[0].parent / "scores.csv")
            assert set(scores) == {"unet2d_random_init", "unet2d_train_e1", "unet2d_train_e2"}
            assert all(_finite(v) for v in scores.values()) and selection["model"] == max(scores, key=scores.get)
            if name == "T4.1-offline":
                tis = selection["tis"]["robustness"]
                assert 0 < tis <= 1 and _finite(tis)
                assert tis == pytest.approx(rows[selection["model"]] / max(rows.values()))
                cosine = scores
            elif "distance" in expect:  # another distance: other scores of the same checkpoints
                assert scores != pytest.approx(cosine), name
        if name == "T4.1-online":
            rob = json.loads(produced[0].read_text())
            assert rob["epochs"][0] == 0 and all(_finite(v) for v in rob["robustness"]) and rob["start_epoch"] == 1
            assert rob["selected_epoch"] is None or rob["selected_epoch"] >= 1
        if name.startswith("F"):
            report = json.loads(produced[0].read_text())
            assert report["task"] == expect["task"] and report["settings"]["level"] == expect["level"]
            assert all(_finite(report[k]) for k in ("auroc", "auprc", "auroc_std", "auprc_std")), report
            assert all(_finite(v["auprc"]) for v in report["per_class"].values())
            assert list(report["per_class"]) == (CHEXPERT_FINDINGS if expect["task"] == "multilabel" else ["disc", "square"])
