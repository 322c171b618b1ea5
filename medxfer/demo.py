"""The README's main job on generated data (``medxfer demo --out runs/demo``).

Today it covers the foundation: generate every synthetic MSD task profile and ISIC 2017 + 2018
sets in their real layouts, validate them with the same checks as ``medxfer check-data``, write
seeded 5-fold splits, and report what was made::

    OUT/data/msd/TaskNN_Name/...        OUT/data/isic2018/ISIC2018_*/...   OUT/data/isic2017/...
    OUT/splits/<dataset>.json           (nnU-Net splits_final.json format)
    OUT/check_report.json               every problem found (none expected)
    OUT/summary.json                    per-dataset numbers (shapes, spacings, labels, prevalence)
    OUT/preview.png                     one slice per task, a few dermoscopy images with outlines

Then the CC-FV study (:mod:`medxfer.study`, the same as ``medxfer study --preset designed``) on
the designed benchmark (``configs/study_designed.yaml``: its ``generated`` family of
:mod:`medxfer.data.synth.graded` tasks, written to ``OUT/data/graded``; models of graded
pretraining length): every estimator's scores, every model fine-tuned with several seeds, the
noise ceiling, which estimator predicted the mean fine-tuning ranking best, with intervals, and
whether the fine-tuning followed the design (:func:`medxfer.study.design_check`)::

    OUT/study/bank/  OUT/study/scores/  OUT/study/finetune_dice.csv  OUT/study/finetune_dice_seeds.csv
    OUT/study/te_evaluation.json|csv  OUT/study/te_statistics.csv  OUT/study/scores_vs_dice.png
    OUT/study/tau_vs_ceiling.png  OUT/study/study.json  OUT/study/design_check.json

``study="quick"`` runs the quick preset's smoke-test budgets on the generated MSD profiles instead
(tests; ``medxfer study --preset quick``), ``study="none"`` skips it.

A killed demo resumes: run the same command again. The generated data is kept when
``OUT/data/demo_data.json`` (written after the data was generated and checked) records the same
seed and sizes — regenerating would give the same bytes but new plans to compute, which the
study's markers would not trust — and the study resumes from its own markers
(:func:`medxfer.study.run_study`). ``OUT/study`` is cleared only when it was made with another
study preset or seed (``OUT/study_config.json``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from medxfer.atomic import atomic_write_text
from medxfer.data.isic import load_isic
from medxfer.data.msd import load_task
from medxfer.data.splits import make_kfold_splits, save_splits
from medxfer.data.summary import save_preview, summarize_isic, summarize_task
from medxfer.data.synth.graded import FAMILY_FILE, generate_graded_family
from medxfer.data.synth.isic import generate_isic
from medxfer.data.synth.msd import MSD_PROFILES, generate_msd
from medxfer.data.validate import check_dataset
from medxfer.jsonfile import write_json
from medxfer.study import design_check, load_preset, run_study

__all__ = ["run_demo", "DEMO_MARKER"]

DEMO_MARKER = ".medxfer-demo"
#: written after the demo's data was generated and checked: what it was generated with
DATA_MARKER = "demo_data.json"
#: the study preset of ``OUT/study``: another preset or seed clears that folder first
STUDY_MARKER = "study_config.json"


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder the demo did not make (it may hold the user's work)."""
    if out.exists() and any(out.iterdir()) and not (out / DEMO_MARKER).exists() and not overwrite:
        raise FileExistsError(f"{out}: folder is not empty and was not made by `medxfer demo`; "
                              "choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / DEMO_MARKER, "made by medxfer demo; its contents are regenerated on every run\n")


def run_demo(out="runs/demo", seed: int = 0, overwrite: bool = False, num_training: int = 6,
             num_isic: int = 40, study: str = "full") -> int:
    """Run the demo; returns the process exit code (0 = data generated and valid)."""
    out = Path(out)
    try:
        _prepare_out(out, overwrite)
    except FileExistsError as e:
        print(f"error: {e}")
        return 1
    t0 = time.perf_counter()
    if study not in ("full", "quick", "none"):
        raise ValueError(f"study must be 'full', 'quick' or 'none', got {study!r}")
    print(f"medxfer demo -> {out}  (seed {seed}; data about 10 s, then the CC-FV study: {study})")
    print(f"[1/4] generating {len(MSD_PROFILES)} MSD task profiles x {num_training} training cases, ISIC 2018 + 2017 x {num_isic} images")
    data_key = {"seed": seed, "num_training": num_training, "num_isic": num_isic, "profiles": sorted(MSD_PROFILES)}
    if _read(out / "data" / DATA_MARKER) == data_key:  # a rerun (e.g. after a kill): same bytes, keep plans
        task_dirs = sorted(p for p in (out / "data" / "msd").iterdir() if (p / "dataset.json").is_file())
        isic_dirs = {year: out / "data" / f"isic{year}" for year in (2018, 2017)}
        print(f"      kept: {out / 'data'} was generated with the same settings ({out / 'data' / DATA_MARKER})")
    else:
        (out / "data" / DATA_MARKER).unlink(missing_ok=True)
        task_dirs = generate_msd(out / "data" / "msd", num_training=num_training, seed=seed, overwrite=True)
        isic_dirs = {year: generate_isic(out / "data" / f"isic{year}", year=year, num_images=num_isic, seed=seed,
                                         overwrite=True) for year in (2018, 2017)}

    print("[2/4] validating (same checks as `medxfer check-data`)")
    reports = check_dataset(out / "data")
    write_json(out / "check_report.json", [r.to_dict() for r in reports])
    problems = [p for r in reports for p in r.problems]
    for p in problems:
        print(f"  {p}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in the generated data, see {out / 'check_report.json'}")
        return 1
    write_json(out / "data" / DATA_MARKER, data_key)

    print("[3/4] writing seeded 5-fold splits")
    tasks = [load_task(d) for d in task_dirs]
    isic_sets = [(year, load_isic(d, year=year)) for year, d in isic_dirs.items()]
    for name, records in [(t.root.name, t.training) for t in tasks] + [(f"isic{y}", r) for y, r in isic_sets]:
        save_splits(make_kfold_splits(records, n_folds=5, seed=seed), out / "splits" / f"{name}.json", overwrite=True)

    print("[4/4] summarising")
    summary = {
        "seed": seed,
        "msd": [summarize_task(t) for t in tasks],
        "isic": [summarize_isic(r, y) for y, r in isic_sets],
        "datasets_checked": len(reports),
        "problems": 0,
    }
    save_preview(tasks, isic_sets, out / "preview.png")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "summary.json", summary)

    print(f"\n{'task':18s} {'train':>5s} {'test':>4s} {'ch':>2s}  {'shape (min..max)':27s} {'spacing mm (min..max)':35s} orientations / labels")
    for s in summary["msd"]:
        shape = f"{s['shape_min'][:3]}..{s['shape_max'][:3]}"
        spacing = f"{s['spacing_min_mm']}..{s['spacing_max_mm']}"
        labels = ", ".join(f"{k} {100 * v:.2f}%" for k, v in s["label_fraction"].items())
        print(f"{Path(s['folder']).name:18s} {s['num_training']:5d} {s['num_test']:4d} {len(s['channels']):2d}  {shape:27s} {spacing:35s} {'/'.join(s['orientations'])} | {labels}")
    for s in summary["isic"]:
        prevalence = ", ".join(f"{k} {v:.2f}" for k, v in s["attribute_prevalence"].items())
        print(f"ISIC {s['year']}: {s['num_images']} images, sizes {s['size_min_hw']}..{s['size_max_hw']} | prevalence: {prevalence}")
    print(f"\nall {len(reports)} datasets valid; wrote {out / 'summary.json'}, {out / 'preview.png'}, {out / 'splits'}  ({summary['seconds']} s)")
    if study == "none":
        return 0
    print()
    preset = "designed" if study == "full" else study  # `medxfer study --preset designed|quick --seed S`
    config = load_preset(preset, {"seed": seed})
    study_key = json.loads(json.dumps(asdict(config), default=str))
    if _read(out / STUDY_MARKER) != study_key:  # the demo's own folder, made with another preset: start afresh
        shutil.rmtree(out / "study", ignore_errors=True)
        write_json(out / STUDY_MARKER, study_key)
    data_dir, design = out / "data" / "msd", None
    if config.generated:  # the designed benchmark: its own generated family (kept when made with the same settings)
        data_dir = out / "data" / "graded"
        params = {**config.generated, "seed": seed}
        design = _read(data_dir / FAMILY_FILE)
        if design is None or any(design.get(k) != (list(v) if isinstance(v, tuple) else v) for k, v in params.items()):
            print(f"generating the designed benchmark's tasks ({params}) -> {data_dir}")
            design = generate_graded_family(data_dir, overwrite=True, **params)
    t1 = time.perf_counter()
    result = run_study(data_dir, out / "study", config)
    print(f"study done in {(time.perf_counter() - t1) / 60:.1f} min (estimated {result['estimate_s']['total'] / 60:.1f}); "
          f"report: {out / 'study' / 'te_evaluation.json'}, plot: {out / 'study' / 'tau_vs_ceiling.png'}")
    if design is not None:
        check = design_check(design, result, out / "study" / "finetune_dice_seeds.csv")
        write_json(out / "study" / "design_check.json", check)
        print("\ndoes the fine-tuning follow the design? (bars: noise ceiling >= 0.8, Spearman vs design >= 0.8, "
              "best designed model beyond the untrained one's seed spread)")
        for target, c in check.items():
            b = c["closest_vs_scratch"]
            print(f"  {target}: noise ceiling {c['noise_ceiling']:+.2f}, Spearman vs design {c['spearman_vs_design']:+.2f}, "
                  f"{b['closest']} - untrained {b['margin']:+.3f} (seed std {b['std_closest']:.3f} / {b['std_scratch']:.3f}): "
                  f"{'meets' if c['accepted'] else 'MISSES'} the bar")
    return 0
