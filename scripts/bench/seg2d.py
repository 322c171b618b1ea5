"""Benchmark of checkpoint selection for 2D segmentation transfer (thesis chapter 4; SPEC section 7); prints JSON.

On generated data (``medxfer synth classes`` for pretraining, ``medxfer synth seg2d`` as the
target), CPU, one process, through the ``seg2d_transfer`` bundle configs:

1. **pretrain** an encoder (U-Net encoder by default, narrowed for the CPU) with a classification
   head for ``--epochs`` epochs, a checkpoint after every epoch into a model bank;
2. **select** offline: score every checkpoint and the random init (``select_checkpoint.yaml``:
   robustness and the feature-based estimators, on the training images of the fine-tuning fold),
   timed;
3. **fine-tune all**: every checkpoint and "no pretraining" (scratch) fine-tuned on the target
   (``train.yaml``, full transfer, same split and budget, ``--finetune-seeds`` repeats with
   different initialisation / augmentation seeds), timed; mean best validation Dice of each;
4. **TIS** (thesis eq. 3.1: Dice of the picked model / best Dice of all fine-tuned models) of:
   robustness offline (highest robustness, the random init included: it stands for "scratch"),
   robustness online (first local maximum
   from epoch 1 on: what :class:`medxfer.handlers.RobustnessEarlyStopping` stops at -- the online
   scores are the offline ones, same images and seed, a tested identity), the last checkpoint, no
   pretraining, and every other estimator; plus wall time of selection vs fine-tuning all.

    python scripts/bench/seg2d.py [--out runs/bench/seg2d] [--epochs 8] [--finetune-epochs 15]

``--legacy`` reruns the settings before issue 17 (fine-tuning recipe ``medxfer_v1``; selection on the
first 16 images of the whole folder, colour jitter 0.4 / 0.4 / 0.4 / 0.1, pooled features, no
random-init candidate); the default is the thesis' (recipe ``thesis``, the authors' jitter, unpooled
features for full fine-tuning, every training image of the fine-tuning fold). Both use batch 8 for
fine-tuning (the tiny target gives batch 24 a single step per epoch).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/seg2d")
    p.add_argument("--arch", default="unet2d")
    p.add_argument("--arch-kwargs", default='{"channels": [16, 32, 64, 128, 256]}', help="JSON (narrow U-Net for CPU)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--images-per-class", type=int, default=30)
    p.add_argument("--target-images", type=int, default=40)
    p.add_argument("--epochs", type=int, default=8, help="pretraining epochs (a checkpoint after each)")
    p.add_argument("--finetune-epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-seeds", type=int, default=3, help="fine-tuning repeats per model (Dice averaged)")
    p.add_argument("--legacy", action="store_true", help="the recipe and selection settings before issue 17")
    args = p.parse_args(argv)

    import numpy as np

    from medxfer.data.synth.shapes2d import generate_classification_folder, generate_seg2d
    from medxfer.jsonfile import json_safe, write_json
    from medxfer.transfer.bank import ModelBank
    from medxfer.transferability.evaluate import tis
    from medxfer.transferability.robustness import first_local_maximum
    from medxfer.workflows.bundle import run_bundle

    out = Path(args.out).absolute()
    classes, target = out / "classes", out / "target"
    if not classes.exists():
        generate_classification_folder(classes, num_classes=args.classes, images_per_class=args.images_per_class,
                                       size=args.image_size, seed=args.seed)
    if not target.exists():
        generate_seg2d(target, num_images=args.target_images, size=(args.image_size, args.image_size), num_classes=1,
                       seed=args.seed + 1)
    arch_kwargs = json.loads(args.arch_kwargs)
    common = {"arch": args.arch, "arch_kwargs": arch_kwargs, "image_size": args.image_size, "device": "cpu",
              "seed": args.seed}
    bank_root = out / "bank"
    wall = {}
    t0 = time.perf_counter()
    if not (bank_root / "bank.yaml").exists():
        run_bundle("seg2d_transfer", ["pretrain_encoder"], quiet=True, data_root=str(classes), bank_root=str(bank_root),
                   output_dir=str(out / "pretrain"), max_epochs=args.epochs, bank_epochs=list(range(1, args.epochs + 1)),
                   batch_size=16, **common)
    wall["pretraining"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    splits = out / "finetune" / "splits.json"
    recipe = "medxfer_v1" if args.legacy else "thesis"
    if args.legacy:  # the whole folder's first 16 images, strong jitter, pooled, no random-init candidate
        selection = {"fold": None, "max_cases": 16, "random_init": False, "start_epoch": 1,
                     "robustness": {"jitter": "strong", "pooled": True}}
    else:            # the fine-tuning fold's training images (same split as the fine-tuning below)
        selection = {"fold": 0, "n_folds": 4, "split_seed": args.seed, "splits_file": str(splits)}
    run_bundle("seg2d_transfer", ["select_checkpoint"], quiet=True, bank_root=str(bank_root), target_root=str(target),
               output_dir=str(out / "selection" / recipe), image_size=args.image_size, device="cpu", **selection)
    wall["selection_all_estimators"] = time.perf_counter() - t0
    rows = json.loads((out / "selection" / recipe / "scores.json").read_text())["rows"]
    wall["selection_robustness_only"] = sum(r["seconds_robustness"] for r in rows)

    bank = ModelBank.open(bank_root)
    names = sorted(bank.names(), key=lambda n: bank.get(n).epoch)
    dice = {}
    t0 = time.perf_counter()
    dice_runs = {}
    for name in names + ["scratch"]:
        dice_runs[name] = []
        for repeat in range(args.finetune_seeds):
            run_dir = out / "finetune" / recipe / name / f"seed{repeat}"
            if not (run_dir / "history.json").exists():
                init = {"transfer_mode": "scratch"} if name == "scratch" else {
                    "transfer_mode": "encoder_only", "bank_root": str(bank_root), "init_entry": name}
                run_bundle("seg2d_transfer", ["train"], quiet=True, data_root=str(target), output_dir=str(run_dir),
                           max_epochs=args.finetune_epochs, batch_size=8, n_folds=4, split_seed=args.seed,
                           splits_file=str(splits), recipe=recipe, **init,
                           **{**common, "seed": args.seed + repeat})
            dice_runs[name].append(json.loads((run_dir / "history.json").read_text())["best"]["val_mean_dice"])
        dice[name] = float(np.mean(dice_runs[name]))
    wall["finetune_all"] = time.perf_counter() - t0
    with open(out / "dice.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "dice"])
        w.writerows([[n, dice[n]] for n in names])

    by_name = {r["model"]: r for r in rows}
    epochs = [bank.get(n).epoch for n in names]
    all_dice = np.array([dice[n] for n in names] + [dice["scratch"]])
    best = float(np.nanmax(all_dice))

    def tis_of(name):
        return dice[name] / best if best > 0 else float("nan")

    robust = [by_name[n]["robustness"] for n in names]
    candidates = [(r["robustness"], "scratch" if r["epoch"] == 0 else r["model"]) for r in rows]
    offline = max(candidates)[1]   # the random init (if scored) stands for fine-tuning from scratch
    online_epoch = first_local_maximum(robust, epochs, start_epoch=1)
    online = names[epochs.index(online_epoch)] if online_epoch is not None else names[-1]  # never peaked: ran to the end
    estimators = ["robustness", "ccfv", "logme", "gbc", "transrate"]
    padded = {e: [by_name[n][e] for n in names] + [float("nan")] for e in estimators}  # scratch is not scored
    report = {
        "data": {"generated": True, "pretraining_classes": args.classes, "images_per_class": args.images_per_class,
                 "target_images": args.target_images, "image_size": args.image_size},
        "budget": {"arch": args.arch, "arch_kwargs": arch_kwargs, "pretraining_epochs": args.epochs,
                   "finetune_epochs": args.finetune_epochs, "finetune_seeds": args.finetune_seeds, "seed": args.seed,
                   "recipe": recipe, "selection": selection},
        "random_init_robustness": next((r["robustness"] for r in rows if r["epoch"] == 0), None),
        "checkpoints": [{"model": n, "epoch": bank.get(n).epoch, "dice": dice[n], "dice_runs": dice_runs[n],
                         **{e: by_name[n][e] for e in estimators}} for n in names],
        "scratch_dice": dice["scratch"],
        "scratch_dice_runs": dice_runs["scratch"],
        "tis": {
            "robustness_offline": {"picked": offline, "tis": tis_of(offline)},
            "robustness_online": {"picked": online, "stopped_after_epoch": None if online_epoch is None else
                                  epochs[epochs.index(online_epoch) + 1], "tis": tis_of(online)},
            "last_checkpoint": {"picked": names[-1], "tis": tis_of(names[-1])},
            "no_pretraining": {"picked": "scratch", "tis": tis_of("scratch")},
            **{e: {"tis": tis(padded[e], all_dice)} for e in estimators if e != "robustness"},
        },
        "wall_seconds": wall,
        "selection_over_finetune_all": {"robustness_only": wall["selection_robustness_only"] / wall["finetune_all"],
                                        "all_estimators": wall["selection_all_estimators"] / wall["finetune_all"]},
    }
    write_json(out / f"seg2d_bench_{recipe}.json", report)
    json.dump(json_safe(report), sys.stdout, indent=1)
    print()
    return report


if __name__ == "__main__":
    main()
