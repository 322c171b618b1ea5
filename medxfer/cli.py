"""The ``medxfer`` command line.

    medxfer synth msd  --out D [--profiles spleen liver ...] [--num-training N] [--seed S]
    medxfer synth isic --out D [--year 2018|2017] [--num-images N] [--size H W] [--seed S]
    medxfer synth classes --out D [--num-classes K] [--images-per-class N] [--size S] [--grey] [--seed S]
    medxfer synth seg2d --out D [--num-images N] [--size H W] [--num-classes K] [--rgb] [--seed S]
    medxfer check-data PATH [--json report.json]
    medxfer split PATH --out splits.json [--folds 5] [--seed 0]
    medxfer plan TASK [--out plans.json]          # nnU-Net v2 planning -> spacing, patch, normalisation
    medxfer convert-isic2017 ROOT                 # released superpixel JSON -> attribute PNGs
    medxfer convert acdc|covid-qu-ex|idrid|ham10000|isic2019 SRC DST  # public downloads -> the layouts read here
    medxfer bank build --data D --target Task09_Spleen --out bank [--overwrite]  # CC-FV leave-one-task-out bank (resumes)
    medxfer rank --bank BANK --data TASK [--dice dice.csv] # score every bank model with every estimator (resumes)
    medxfer bank list BANK                        # entries of a bank manifest, sha256 checked
    medxfer bank import BANK bundle|nnunet|checkpoint SOURCE [--name N]  # models you have (zoo, nnU-Net, state dicts)
    medxfer study [--preset demo|quick|ccfv_msd|FILE] --data D --out O [--set K=V] [--dry-run]  # the CC-FV study (resumes)
    medxfer demo --out runs/demo          # the README's main job on generated data

Every medxfer module is imported at the top (the package's layer rule, ``tests/test_layers.py``),
so even ``medxfer --help`` pays for importing torch and MONAI.

Errors: bad input gives one line ``error: <file>: <problem>``; an OS error (full disk, no
permission, read-only file system, ...) gives one line ``medxfer: <path>: <reason>``; both exit
with code 1 and no traceback (``MEDXFER_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from medxfer.atomic import WriteError
from medxfer.data.convert import CONVERTERS
from medxfer.data.isic import convert_isic2017_superpixels, detect_isic_year, load_isic
from medxfer.data.msd import load_task
from medxfer.data.problems import DatasetError
from medxfer.data.splits import make_kfold_splits, save_splits
from medxfer.data.synth.isic import generate_isic
from medxfer.data.synth.msd import MSD_PROFILES, generate_msd
from medxfer.data.synth.shapes2d import generate_classification_folder, generate_seg2d
from medxfer.data.synth.zoo_bundle import ZOO_NETWORKS, write_zoo_bundle
from medxfer.data.validate import check_dataset
from medxfer.demo import run_demo
from medxfer.distributed import DistributedError, env_rank
from medxfer.jsonfile import write_json
from medxfer.planning import plan_task
from medxfer.planning.nnunet_model import train_nnunet_model
from medxfer.study import format_dry_run, load_preset, parse_overrides, plan_study, run_study
from medxfer.transfer.bank import BankError, ModelBank
from medxfer.transfer.bank_import import IMPORT_KINDS, import_model, nnunet_finetune_command, read_layout
from medxfer.transfer.weights import CheckpointError, read_checkpoint
from medxfer.transferability.evaluate import evaluate_estimators, plot_scores, table_from_files, write_report
from medxfer.transferability.features import SamplingConfig
from medxfer.transferability.score import DEFAULT_ESTIMATORS, clear_scores, score_bank_into
from medxfer.workflows.bank_build import PretrainingFailed, build_ccfv_bank, load_bank_config
from medxfer.workflows.msd_seg3d import task_plans
from medxfer.workflows.zoo_export import export_bundle, source_from_bank, source_from_run

__all__ = ["main", "build_parser"]


def _error(err: Exception) -> int:
    """Report an expected failure (bad data, existing output) in one line; exit code 1."""
    print(f"error: {err}", file=sys.stderr)
    return 1


def _cmd_synth_msd(args) -> int:
    unknown = [p for p in args.profiles or [] if p not in MSD_PROFILES]
    if unknown:
        print(f"error: unknown profile(s) {unknown}; choose from {sorted(MSD_PROFILES)}", file=sys.stderr)
        return 2
    kwargs = dict(num_training=args.num_training, num_test=args.num_test, seed=args.seed,
                  spacing_jitter=args.spacing_jitter, overwrite=args.overwrite)
    if args.shape:
        kwargs["shape"] = tuple(args.shape)
    if args.spacing:
        kwargs["spacing"] = tuple(args.spacing)
    try:
        folders = generate_msd(args.out, profiles=args.profiles, **kwargs)
    except FileExistsError as e:
        return _error(e)
    for f in folders:
        print(f)
    return 0


def _cmd_synth_isic(args) -> int:
    try:
        out = generate_isic(args.out, year=args.year, num_images=args.num_images, size=tuple(args.size),
                            seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as e:
        return _error(e)
    print(out)
    return 0

def _cmd_synth_classes(args) -> int:
    try:
        out = generate_classification_folder(args.out, num_classes=args.num_classes,
                                             images_per_class=args.images_per_class, size=args.size,
                                             seed=args.seed, grey=args.grey, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        return _error(e)
    print(out)
    return 0


def _cmd_synth_seg2d(args) -> int:
    try:
        out = generate_seg2d(args.out, num_images=args.num_images, size=tuple(args.size),
                             num_classes=args.num_classes, grey=not args.rgb, seed=args.seed,
                             size_jitter=args.size_jitter, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        return _error(e)
    print(out)
    return 0


def _cmd_synth_bundle(args) -> int:
    try:
        state = read_checkpoint(args.weights) if args.weights else None
        out = write_zoo_bundle(args.out, args.network, name=args.name, in_channels=args.in_channels,
                               out_channels=args.out_channels, roi_size=args.roi, pixdim=args.pixdim,
                               intensity=args.intensity, seed=args.seed, state_dict=state, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        return _error(e)
    print(out)
    return 0


def _cmd_synth_nnunet_model(args) -> int:
    try:
        fold = int(args.fold) if str(args.fold).isdigit() else args.fold
        folder = train_nnunet_model(args.task, args.out, dataset_id=args.dataset_id, fold=fold,
                                    num_epochs=args.epochs, iterations=args.iterations, seed=args.seed,
                                    overwrite=args.overwrite)
    except (DatasetError, FileExistsError, RuntimeError, ValueError) as e:
        return _error(e)
    print(folder)
    return 0


def _cmd_check_data(args) -> int:
    reports = check_dataset(args.path, progress=not args.quiet)
    n_problems = 0
    for report in reports:
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        print(f"{report.kind:10s} {report.path}  {report.num_cases} case(s)  {status}")
        for p in report.problems:
            print(f"  {p}")
        n_problems += len(report.problems)
    if args.json:
        write_json(args.json, [r.to_dict() for r in reports])
    return 1 if n_problems else 0


def _cmd_split(args) -> int:
    try:
        year = detect_isic_year(args.path)
        records = load_isic(args.path, year=year, task=1) if year else load_task(args.path).training
        splits = make_kfold_splits(records, n_folds=args.folds, seed=args.seed)
        save_splits(splits, args.out, overwrite=args.overwrite)
    except (DatasetError, FileExistsError, ValueError) as e:
        return _error(e)
    print(f"{args.out}: {args.folds} folds over {len(records)} cases (seed {args.seed})")
    return 0


def _cmd_convert_isic2017(args) -> int:
    try:
        written = convert_isic2017_superpixels(args.root, overwrite=args.overwrite)
    except (DatasetError, FileExistsError) as e:
        return _error(e)
    print(f"wrote {len(written)} attribute mask(s) under {args.root}")
    return 0


def _cmd_convert(args) -> int:
    options = {name: getattr(args, name) for name in ("subset", "lesions", "include_testing") if hasattr(args, name)}
    try:
        summary = CONVERTERS[args.dataset](args.src, args.dst, overwrite=args.overwrite, link=args.link, **options)
    except (DatasetError, FileExistsError, ValueError) as e:
        return _error(e)
    counts = {k: v for k, v in summary.items() if k != "dst"}
    images = summary.get("images", summary.get("training"))
    print(f"{summary['dst']}: {images} image(s) / case(s) converted from {args.src} ({json.dumps(counts)})")
    return 0


def _cmd_plan(args) -> int:
    try:
        plans = plan_task(args.task, out=args.out, configuration=args.configuration, overwrite=args.overwrite)
    except (DatasetError, FileExistsError, RuntimeError, ValueError) as e:
        return _error(e)
    print(json.dumps({k: plans[k] for k in ("task", "target_spacing", "patch_size", "batch_size", "normalization")}, indent=2))
    return 0


def _cmd_bank_build(args) -> int:
    try:
        config = load_bank_config(args.config, epochs=args.epochs, patch_size=args.patch, optimizer=args.optimizer)
        if args.archs:
            unknown = [a for a in args.archs if a not in config["archs"]]
            if unknown:
                raise DatasetError(args.config or "configs/bank_ccfv.yaml", f"archs {unknown} not defined there "
                                   f"(defined: {sorted(config['archs'])})")
            config["archs"] = {a: config["archs"][a] for a in args.archs}
        summary = build_ccfv_bank(args.data, args.target, args.out, config, device=args.device, seed=args.seed,
                                  num_workers=args.num_workers, overwrite=args.overwrite, workers=args.workers)
    except (DatasetError, BankError, FileExistsError, ValueError, PretrainingFailed) as e:
        return _error(e)
    for item in summary["entries"]:
        done = "  (already done, kept)" if item.get("already_done") else ""
        print(f"{item['arch']:10s} {item['source'] or 'scratch':20s} {', '.join(item['entries'])}{done}")
    for item in summary["skipped_sources"]:
        print(f"skipped {item['task']}: {item['reason']}")
    if summary["already_done"]:
        n_runs = sum(1 for item in summary["entries"] if item["source"] is not None)
        print(f"resumed: {len(summary['already_done'])} of {n_runs} pretraining run(s) were already done and kept "
              f"({', '.join(summary['already_done'])})")
    print(f"bank: {Path(args.out) / 'bank.yaml'}")
    return 0


def _cmd_bank_list(args) -> int:
    try:
        bank = ModelBank.open(args.bank)
        bad = 0
        for entry in bank:
            try:
                bank.verify(entry.name)
                status = "ok"
            except BankError as e:
                status, bad = f"BROKEN: {e}", bad + 1  # names the file
            source = "+".join(entry.source) or "scratch"
            kind = f"{entry.provenance.get('kind', 'medxfer')}/{entry.preprocessing_kind}"
            print(f"{entry.name:40s} {entry.arch:10s} {source:24s} {kind:22s} epoch {entry.epoch}  {status}")
    except BankError as e:
        return _error(e)
    return 1 if bad else 0


def _json_or_file(text: str | None, what: str):
    """A JSON value given inline (``'{"a": 1}'``) or as a JSON / YAML file path."""
    if text is None:
        return None
    if Path(text).is_file():
        return read_layout(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(text, f"{what}: neither a file nor valid JSON ({e.msg})") from None


def _cmd_bank_import(args) -> int:
    options: dict = {"name": args.name, "replace": args.replace, "layout": _json_or_file(args.layout, "--layout")}
    if args.kind == "bundle":
        options["config"] = args.config
    elif args.kind == "nnunet":
        options.update(fold=args.fold, checkpoint=args.checkpoint)
    else:
        if not args.arch:
            return _error(DatasetError(args.source, "--arch is required for a checkpoint import"))
        pre = _json_or_file(args.preprocessing, "--preprocessing")
        if isinstance(pre, list):  # a bare transform list
            pre = {"kind": "monai", "transforms": pre}
        options.update(arch=args.arch, arch_kwargs=_json_or_file(args.arch_kwargs, "--arch-kwargs"),
                       in_channels=args.in_channels, out_channels=args.out_channels, patch_size=args.patch,
                       preprocessing=pre, url=args.url or "", version=args.version or "", licence=args.licence or "")
    try:
        entry = import_model(args.bank, args.kind, args.source, **options)
    except (DatasetError, BankError, ValueError) as e:
        return _error(e)
    print(f"{entry.name}: {entry.arch} {entry.in_channels}->{entry.out_channels} channels, patch {entry.patch_size}, "
          f"preprocessing {entry.preprocessing_kind}, sha256 {entry.sha256[:12]}  ->  {Path(args.bank) / 'bank.yaml'}")
    command = nnunet_finetune_command(entry, args.bank)
    if command:
        print(command)
    return 0


def _cmd_rank(args) -> int:
    out = Path(args.out)
    estimators = args.estimators or list(DEFAULT_ESTIMATORS)
    try:
        plans = task_plans(args.data)
        if args.overwrite and env_rank() == 0:  # under torchrun rank 0 alone touches --out
            ModelBank.open(args.bank)  # a wrong --bank is an error before the old scores go
            clear_scores(out)
        rows, already_done = score_bank_into(out, args.bank, args.data, plans, estimators, SamplingConfig(seed=args.seed),
                                             device=args.device, max_cases=args.max_cases,
                                             meta={"bank": str(args.bank), "target": str(args.data),
                                                   "estimators": estimators})
        if env_rank() != 0:  # torchrun: the other ranks scored their share; rank 0 reports
            return 0
        if args.dice:
            table = table_from_files(out / "scores.json", args.dice)
            result = evaluate_estimators(table)
            write_report(result, out)
            plot_scores(table, out / "scores_vs_dice.png", result=result)
    except (DatasetError, BankError, FileExistsError, ValueError, DistributedError) as e:
        return _error(e)
    if already_done:
        print(f"{out / 'scores.json'}: scored before with these settings (kept, not scored again)")
    print(f"{'estimator':15s} best model by this estimator")
    for name in estimators:
        scored = [r for r in rows if r[name] == r[name]]  # NaN != NaN: undefined scores left out
        best = max(scored, key=lambda r: r[name])["model"] if scored else "(undefined)"
        print(f"{name:15s} {best}")
    if args.dice:
        print(f"\n{'estimator':15s} {'w. tau':>8s} {'pearson':>8s} {'TIS':>6s}")
        for name in estimators:
            m = result["mean"][name]
            print(f"{name:15s} {m['weighted_tau']:8.3f} {m['pearson']:8.3f} {m['tis']:6.3f}")
    print(f"scores: {out / 'scores.csv'}")
    return 0


def _cmd_export_bundle(args) -> int:
    if bool(args.run) == bool(args.bank):
        print("error: give --run RUN_DIR or --bank BANK --entry NAME", file=sys.stderr)
        return 2
    try:
        if args.run:
            source = source_from_run(args.run, name=args.name, fold=args.fold)
        else:
            if not args.entry:
                raise DatasetError(args.bank, "--entry is required with --bank")
            if args.fold is not None:
                raise ValueError("--fold applies to --run with a TATL run folder (tatl_run.json)")
            source = source_from_bank(args.bank, args.entry)
            if args.name:
                source.name = args.name
        out = export_bundle(args.out, source, version=args.version, authors=args.authors, overwrite=args.overwrite)
    except (DatasetError, BankError, FileExistsError, ValueError) as e:
        return _error(e)
    scripts = " + scripts/ (the network's code)" if (Path(out) / "scripts").is_dir() else ""
    if source.kind == "tatl":
        print(f"{out}: configs/inference.json ({len(source.networks)} networks, one <name>_def each; no training "
              "configs, see docs/README.md), configs/metadata.json, models/model.pt + models/<name>.pt, "
              "docs/README.md + scripts/ (the TATL pipeline and LinkNet code)")
    else:
        print(f"{out}: configs/inference.json, train.json, evaluate.json, multi_gpu_train.json (MONAI only), "
              f"configs/metadata.json, models/model.pt, docs/README.md{scripts}")
    print(f"run it: python -m monai.bundle run --config_file {out}/configs/inference.json --bundle_root {out} "
          "--dataset_dir IMAGES")
    return 0


def _cmd_demo(args) -> int:
    return run_demo(args.out, seed=args.seed, overwrite=args.overwrite, study=args.study)


def _cmd_study(args) -> int:
    try:
        overrides = parse_overrides(args.set)
        overrides.update({k: getattr(args, k) for k in ("seeds", "workers", "device") if getattr(args, k) is not None})
        config = load_preset(args.preset, overrides)
        if args.dry_run:
            print(format_dry_run(plan_study(args.data, config), args.data))
            return 0
        if not args.data:
            raise ValueError("--data is required (the folder holding the TaskNN_Name folders) unless --dry-run")
        result = run_study(args.data, args.out, config, progress=not args.quiet, max_jobs=args.max_jobs)
    except (DatasetError, BankError, FileExistsError, ValueError) as e:
        return _error(e)
    if not result.get("stopped"):
        print(f"report: {Path(args.out) / 'te_evaluation.json'}, {Path(args.out) / 'te_statistics.csv'}; "
              f"plots: {Path(args.out) / 'tau_vs_ceiling.png'}, {Path(args.out) / 'scores_vs_dice.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medxfer", description="Transfer-learning workbench for medical image segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="generate data in the real MSD / ISIC layouts and 2D shape sets")
    synth_sub = synth.add_subparsers(dest="dataset", required=True)
    msd = synth_sub.add_parser("msd", help="synthetic Medical Segmentation Decathlon tasks (TaskNN_Name folders)")
    msd.add_argument("--out", required=True, help="folder that receives the TaskNN_Name folders")
    msd.add_argument("--profiles", nargs="+", help="task profiles (default: all)")
    msd.add_argument("--num-training", type=int, default=6)
    msd.add_argument("--num-test", type=int, default=2)
    msd.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="base voxel shape")
    msd.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="base spacing in mm")
    msd.add_argument("--spacing-jitter", type=float, default=0.1, help="relative in-plane spacing jitter per case (0 = none)")
    msd.add_argument("--seed", type=int, default=0)
    msd.add_argument("--overwrite", action="store_true", help="replace existing task folders")
    msd.set_defaults(func=_cmd_synth_msd)
    isic = synth_sub.add_parser("isic", help="synthetic ISIC 2017/2018 Task 1 + Task 2 folders")
    isic.add_argument("--out", required=True)
    isic.add_argument("--year", type=int, choices=(2017, 2018), default=2018)
    isic.add_argument("--num-images", type=int, default=20)
    isic.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(96, 128))
    isic.add_argument("--seed", type=int, default=0)
    isic.add_argument("--overwrite", action="store_true")
    isic.set_defaults(func=_cmd_synth_isic)
    classes = synth_sub.add_parser("classes", help="generated shape images, one folder per class (ImageFolder layout, pretraining)")
    classes.add_argument("--out", required=True)
    classes.add_argument("--num-classes", type=int, default=4,
                         help="2..8 shape kinds, in this order: disc square triangle ring cross stripes star checker")
    classes.add_argument("--images-per-class", type=int, default=20)
    classes.add_argument("--size", type=int, default=64, help="image side in pixels")
    classes.add_argument("--grey", action="store_true", help="8-bit grey PNGs instead of RGB")
    classes.add_argument("--seed", type=int, default=0)
    classes.add_argument("--overwrite", action="store_true")
    classes.set_defaults(func=_cmd_synth_classes)
    seg2d = synth_sub.add_parser("seg2d", help="generated 2D segmentation set (images/ + masks/ + labels.json)")
    seg2d.add_argument("--out", required=True)
    seg2d.add_argument("--num-images", type=int, default=20)
    seg2d.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(64, 64))
    seg2d.add_argument("--num-classes", type=int, default=1, help="foreground classes 1..9 (1: binary, 0/255 masks)")
    seg2d.add_argument("--rgb", action="store_true", help="RGB images instead of 8-bit grey")
    seg2d.add_argument("--size-jitter", type=float, default=0.1, help="relative per-image jitter of H and W (0 = none)")
    seg2d.add_argument("--seed", type=int, default=0)
    seg2d.add_argument("--overwrite", action="store_true")
    seg2d.set_defaults(func=_cmd_synth_seg2d)
    zoo = synth_sub.add_parser("bundle", help="a MONAI model-zoo bundle folder (zoo layout, JSON configs, models/model.pt) "
                                              "to try bank import offline")
    zoo.add_argument("--out", required=True, help="bundle folder")
    zoo.add_argument("--network", choices=sorted(ZOO_NETWORKS), default="unet")
    zoo.add_argument("--name", help="metadata name (default <network>_ct_segmentation)")
    zoo.add_argument("--in-channels", type=int, default=1)
    zoo.add_argument("--out-channels", type=int, default=2)
    zoo.add_argument("--roi", type=int, nargs=3, default=(64, 64, 64), help="inferer window")
    zoo.add_argument("--pixdim", type=float, nargs=3, default=(1.5, 1.5, 2.0), help="Spacingd target spacing (mm)")
    zoo.add_argument("--intensity", type=float, nargs=2, default=(-57.0, 164.0), metavar=("A_MIN", "A_MAX"),
                     help="ScaleIntensityRanged window (HU)")
    zoo.add_argument("--weights", help="state dict to ship as models/model.pt (default: seeded initialisation)")
    zoo.add_argument("--seed", type=int, default=0)
    zoo.add_argument("--overwrite", action="store_true")
    zoo.set_defaults(func=_cmd_synth_bundle)
    nnu = synth_sub.add_parser("nnunet-model", help="an nnU-Net v2 trained-model folder made by nnU-Net itself (convert, "
                                                    "plan and preprocess, its plain trainer on CPU for a few iterations)")
    nnu.add_argument("--task", required=True, help="MSD TaskNN_Name or nnU-Net DatasetNNN_Name folder (>= 2 cases)")
    nnu.add_argument("--out", required=True, help="folder that receives nnUNet_raw / _preprocessed / _results")
    nnu.add_argument("--dataset-id", type=int, default=990)
    nnu.add_argument("--fold", default="0")
    nnu.add_argument("--epochs", type=int, default=1, help="nnU-Net epochs (its default 1000)")
    nnu.add_argument("--iterations", type=int, default=2, help="iterations per epoch (its default 250)")
    nnu.add_argument("--seed", type=int, default=0)
    nnu.add_argument("--overwrite", action="store_true")
    nnu.set_defaults(func=_cmd_synth_nnunet_model)

    check = sub.add_parser("check-data", help="validate every dataset under PATH; exit 1 if any problem")
    check.add_argument("path")
    check.add_argument("--json", help="also write the report as JSON")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=_cmd_check_data)

    split = sub.add_parser("split", help="seeded k-fold split of a dataset, saved as JSON (nnU-Net splits_final.json format)")
    split.add_argument("path")
    split.add_argument("--out", required=True)
    split.add_argument("--folds", type=int, default=5)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--overwrite", action="store_true")
    split.set_defaults(func=_cmd_split)

    conv = sub.add_parser("convert-isic2017", help="ISIC 2017 Part 2 superpixel JSON -> one 0/255 PNG per attribute")
    conv.add_argument("root", help="folder holding ISIC-2017_Training_Data and ISIC-2017_Training_Part2_GroundTruth")
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(func=_cmd_convert_isic2017)

    convert = sub.add_parser("convert", help="a public download, as published, -> the layout medxfer reads "
                                             "(MSD task, 2D segmentation folder or class-per-folder images)")
    convert_sub = convert.add_subparsers(dest="dataset", required=True)
    for name, text in (("acdc", "ACDC cardiac MR (database/training/patientNNN/) -> MSD task folder"),
                       ("covid-qu-ex", "COVID-QU-Ex chest X-ray lung / infection masks -> images/ + masks/ + labels.json"),
                       ("idrid", "IDRiD fundus lesion TIFF masks (A. Segmentation/) -> images/ + masks/ + labels.json"),
                       ("ham10000", "HAM10000 metadata + images -> one folder per diagnosis (ImageFolder)"),
                       ("isic2019", "ISIC 2019 one-hot ground-truth CSV + images -> one folder per class (ImageFolder)")):
        one = convert_sub.add_parser(name, help=text)
        one.add_argument("src", help="the download as published (unzipped)")
        one.add_argument("dst", help="output folder (must not exist unless --overwrite)")
        one.add_argument("--overwrite", action="store_true", help="replace DST once the new one is complete")
        one.add_argument("--link", action="store_true", help="hard-link images instead of copying (same file system)")
        if name == "acdc":
            one.add_argument("--no-testing", dest="include_testing", action="store_false", help="leave out testing/")
        if name == "covid-qu-ex":
            one.add_argument("--subset", choices=["lung", "infection"], default="lung")
        if name == "idrid":
            one.add_argument("--lesions", nargs="+", default=["MA", "HE", "EX", "SE"],
                             help="classes 1..K in this order (MA HE EX SE OD); on overlap the first listed wins")
        if name == "isic2019":
            one.add_argument("--subset", choices=["Training", "Test"], default="Training")
        one.set_defaults(func=_cmd_convert)

    plan = sub.add_parser("plan", help="nnU-Net v2 planning of a task -> medxfer plans JSON (spacing, patch, normalisation)")
    plan.add_argument("task", help="MSD TaskNN_Name or nnU-Net DatasetNNN_Name folder")
    plan.add_argument("--out", help="plans JSON (default TASK/medxfer_plans.json)")
    plan.add_argument("--configuration", default="3d_fullres", choices=("3d_fullres", "2d"))
    plan.add_argument("--overwrite", action="store_true", help="replace existing (maybe hand-edited) plans")
    plan.set_defaults(func=_cmd_plan)

    bank = sub.add_parser("bank", help="model banks of pretrained networks (SPEC section 4)")
    bank_sub = bank.add_subparsers(dest="bank_command", required=True)
    build = bank_sub.add_parser("build", help="CC-FV bank for one target: every other task x arch pretrained, plus scratch")
    build.add_argument("--data", required=True, help="folder holding the MSD task folders")
    build.add_argument("--target", required=True, help="target task folder name, e.g. Task09_Spleen (left out)")
    build.add_argument("--out", required=True, help="bank folder (bank.yaml, checkpoints/, runs/)")
    build.add_argument("--config", help="bank definition YAML (default configs/bank_ccfv.yaml)")
    build.add_argument("--archs", nargs="+", help="subset of the definition's archs (default: all)")
    build.add_argument("--epochs", type=int, help="pretraining epochs per entry")
    build.add_argument("--patch", type=int, nargs=3, metavar=("X", "Y", "Z"), help="patch size in voxels")
    build.add_argument("--optimizer", choices=("adamw", "sgd"))
    build.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    build.add_argument("--num-workers", type=int, default=0)
    build.add_argument("--workers", type=int, default=1,
                       help="pretraining runs in parallel, each a single-thread process (one GPU each where several "
                            "exist); the bank equals that of --workers 1 run with one torch thread")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true",
                       help="rebuild everything (a bank of other settings in --out is otherwise refused; "
                            "a killed build of the same settings resumes, finished runs kept)")
    build.set_defaults(func=_cmd_bank_build)
    lst = bank_sub.add_parser("list", help="entries of a bank with their sha256 checked (exit 1 if any is broken)")
    lst.add_argument("bank")
    lst.set_defaults(func=_cmd_bank_list)
    imp = bank_sub.add_parser("import", help="add a model you have: a MONAI zoo bundle, an nnU-Net v2 trained model "
                                             "or a state dict (refused if the name exists, unless --replace)")
    imp.add_argument("bank", help="bank folder (created if missing)")
    imp.add_argument("kind", choices=IMPORT_KINDS)
    imp.add_argument("source", help="bundle folder | nnU-Net <trainer>__<plans>__<config> folder | checkpoint file")
    imp.add_argument("--name", help="entry name (default: from the source)")
    imp.add_argument("--replace", action="store_true", help="replace an entry of the same name")
    imp.add_argument("--layout", help="JSON / YAML file (or inline JSON) with encoder_levels, decoder_stages, head, "
                                      "penultimate_encoder: overrides the automatic layout")
    imp.add_argument("--config", help="bundle: inference config other than configs/inference.json|yaml")
    imp.add_argument("--fold", default="0", help="nnunet: fold folder (default 0; 'all' for fold_all)")
    imp.add_argument("--checkpoint", default="checkpoint_final.pth", choices=("checkpoint_final.pth", "checkpoint_best.pth"),
                     help="nnunet: which checkpoint")
    imp.add_argument("--arch", help="checkpoint: registered network name (medxfer bank import ... --arch x lists them)")
    imp.add_argument("--arch-kwargs", help="checkpoint: JSON (or file) of the network's keyword arguments")
    imp.add_argument("--in-channels", type=int, help="checkpoint: input channels (default: read from the weights)")
    imp.add_argument("--out-channels", type=int, help="checkpoint: output channels (default: read from the weights)")
    imp.add_argument("--patch", type=int, nargs="+", help="checkpoint: window size (default 96 96 96)")
    imp.add_argument("--preprocessing", help="checkpoint: MONAI transform list (JSON / YAML file or inline) the "
                                             "model expects; default: the target's own plans")
    imp.add_argument("--url", help="checkpoint: where it was published (provenance)")
    imp.add_argument("--version", help="checkpoint: version (provenance)")
    imp.add_argument("--licence", help="checkpoint: licence (provenance)")
    imp.set_defaults(func=_cmd_bank_import)

    rank = sub.add_parser("rank", help="transferability scores of every bank model on a target task (no fine-tuning)")
    rank.add_argument("--bank", required=True, help="model bank folder (bank.yaml)")
    rank.add_argument("--data", required=True, help="target task folder (labelled training cases are scored)")
    rank.add_argument("--out", default="runs/rank", help="scores.csv / scores.json (+ evaluation with --dice)")
    rank.add_argument("--estimators", nargs="+", help="default: all (ccfv ccfv_official logme gbc transrate transrate_official leep nce robustness)")
    rank.add_argument("--dice", help="CSV model,dice of fine-tuned bank models: also evaluate the estimators")
    rank.add_argument("--max-cases", type=int, help="score on the first N labelled cases only")
    rank.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    rank.add_argument("--seed", type=int, default=0)
    rank.add_argument("--overwrite", action="store_true",
                      help="score everything again (scores of other settings in --out are otherwise refused; "
                           "the same settings' finished scores are kept, a killed scoring resumes)")
    rank.set_defaults(func=_cmd_rank)

    exp = sub.add_parser("export-bundle", help="a self-contained MONAI model-zoo bundle of a trained 3D or 2D "
                                               "model or of one fold of a TATL run (inference with MONAI only; 2D "
                                               "networks and the TATL pipeline MONAI lacks travel in the bundle's "
                                               "scripts/)")
    exp.add_argument("--run", help="a finished bundles/msd_seg3d training / fine-tuning run folder, a "
                                   "bundles/seg2d_transfer training run folder (run.json) or a bundles/tatl_skin "
                                   "run folder (tatl_run.json; with --fold)")
    exp.add_argument("--fold", type=int, help="TATL runs: the fold whose networks to export (default: the lowest)")
    exp.add_argument("--bank", help="a model bank folder (with --entry)")
    exp.add_argument("--entry", help="bank entry name")
    exp.add_argument("--out", required=True, help="bundle folder to write")
    exp.add_argument("--name", help="bundle name (metadata)")
    exp.add_argument("--version", default="0.1.0")
    exp.add_argument("--authors", default="medxfer user")
    exp.add_argument("--overwrite", action="store_true")
    exp.set_defaults(func=_cmd_export_bundle)

    study = sub.add_parser("study", help="the CC-FV study: bank, scores, fine-tuning with several seeds, estimators "
                                         "against the mean Dice with noise ceiling and intervals (resumes after a kill)")
    study.add_argument("--preset", default="demo", help="demo (default: the demo's budgets), quick (smoke test), "
                                                        "ccfv_msd (the paper's protocol on real MSD) or a YAML file")
    study.add_argument("--data", help="folder holding the MSD TaskNN_Name folders (a dry run without it uses the "
                                      "published case counts)")
    study.add_argument("--out", default="runs/study")
    study.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset setting (YAML value), "
                                                                          "e.g. --set finetune_iterations=1000")
    study.add_argument("--seeds", type=int, help="fine-tuning seeds per (model, target)")
    study.add_argument("--workers", type=int, help="parallel fine-tuning processes (default: one per GPU, or CPU cores)")
    study.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    study.add_argument("--dry-run", action="store_true", help="print the configuration, the job list and the time estimate")
    study.add_argument("--max-jobs", type=int, help="stop after N jobs (run again to continue)")
    study.add_argument("--quiet", action="store_true", help="no progress bars (one line per finished job)")
    study.set_defaults(func=_cmd_study)

    demo = sub.add_parser("demo", help="the main job on generated data (README quick start)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder not made by a previous demo")
    demo.add_argument("--study", choices=("full", "quick", "none"), default="full",
                      help="the CC-FV study after the data: full (about 10 min on 2 CPU cores), quick (smoke test), none")
    demo.set_defaults(func=_cmd_demo)
    return parser


# OS errors that say something about the machine (space, permissions), not about a bug: reported in
# one line also when a library wrapped them in another exception (``raise ... from err``)
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def _os_error_in(err: BaseException) -> OSError | None:
    """``err`` if it is an OSError, else the first machine OSError (:data:`_MACHINE_ERRNOS`) among
    its causes (``__cause__``, or ``__context__`` unless suppressed)."""
    if isinstance(err, OSError):
        return err
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _MACHINE_ERRNOS:
            return err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def _os_error_line(err: OSError) -> str:
    """One line for an OS error: ``medxfer: <path>: <reason> (<ERRNO NAME>)``."""
    if isinstance(err, WriteError):
        return f"medxfer: {err}"
    if err.strerror:
        name = errno.errorcode.get(err.errno or 0)
        reason = err.strerror[:1].lower() + err.strerror[1:] + (f" ({name})" if name else "")
    else:
        reason = str(err)
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return "medxfer: " + (f"{' -> '.join(paths)}: " if paths else "") + " ".join(reason.splitlines()[:1])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Expected failures are one line on stderr and exit code 1, never a traceback: bad data or
    checkpoints (:class:`DatasetError`, :class:`medxfer.transfer.weights.CheckpointError`) as
    ``error: <file>: <problem>``; OS errors, :class:`medxfer.atomic.WriteError` included (full
    disk, permissions), as ``medxfer: <path>: <reason>``. ``MEDXFER_DEBUG=1`` re-raises instead.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DatasetError, CheckpointError) as e:
        if os.environ.get("MEDXFER_DEBUG"):
            raise
        return _error(e)
    except Exception as e:  # noqa: BLE001 -- only OS errors are turned into one line, see below
        found = _os_error_in(e)
        if found is None or os.environ.get("MEDXFER_DEBUG"):
            raise
        print(_os_error_line(found), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
