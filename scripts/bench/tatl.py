"""Benchmark of the TATL skin-attribute bundle (SPEC section 6, paper Table 3); prints JSON.

On generated ISIC 2018 data (``medxfer synth isic``; 5 attributes with roughly the ISIC prevalence),
all on the CPU with a fixed small budget, through the bundle configs (``tatl.yaml`` + ablation
overlays, run in-process with :func:`medxfer.workflows.bundle.run_bundle`):

1. **accuracy**: k-fold cross-validation (default 3 folds) of "TATL Stage 3" (target segmenters on
   whole images) and "TATL Stage 1, 2, 3" (Segment-Net crop -> attribute-agnostic segmenter ->
   target segmenters, freeze), U + Link shape averaged; per attribute Jaccard / Dice pooled over each
   test fold's images at 256x256 (ISIC 2018 Task 2), mean and std over folds. No ImageNet weights
   exist offline: every encoder starts random (both rows are the paper's "w/o ImgNet" setting);
2. **inference speed**: images per second of the full pipeline (Segment-Net + 5 attributes x
   (U + Link) = 11 forward passes, crop, paste back) with the trained networks of fold 0 at the
   benchmark's working size, and with untrained networks (the speed does not depend on the weights)
   at the paper's 384x512 on generated images of dermoscope-like size (768x1024);
3. **union map** (issue 17): Jaccard of the union map against the union of the ground-truth
   attribute masks (pixels pooled per test fold at 256x256, mean over folds), for both union
   sources of the stages 1+2+3 run: the stage-2 attribute-agnostic segmenters (``stage2``, the
   paper's) and the OR of the attribute masks (``or_stage3``); and the networks' parameter counts.

``--decoder-block linknet`` trains the networks medxfer built before issue 17 (the "before" run).

    python scripts/bench/tatl.py [--out runs/bench/tatl] [--images 48] [--folds 3] [--epochs 12]
                                 [--decoder-block paper|linknet] [--configs stage3 stages123]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ATTRIBUTES_2018 = ("pigment_network", "globules", "milia_like_cyst", "negative_network", "streaks")
#: TATL paper, Table 3 (ISIC 2018, 5-fold CV, with ImageNet weights unless noted): (Jaccard, Dice).
PAPER_TABLE3 = {
    "stage3": {"pigment_network": (0.532, 0.691), "globules": (0.308, 0.471), "milia_like_cyst": (0.141, 0.252),
               "negative_network": (0.149, 0.260), "streaks": (0.139, 0.241), "mean": (0.254, 0.383)},
    "stages123": {"pigment_network": (0.584, 0.730), "globules": (0.379, 0.552), "milia_like_cyst": (0.172, 0.288),
                  "negative_network": (0.283, 0.438), "streaks": (0.254, 0.401), "mean": (0.334, 0.482)},
    "stages123_no_imagenet": {"pigment_network": (0.565, 0.721), "globules": (0.359, 0.528),
                              "milia_like_cyst": (0.161, 0.277), "negative_network": (0.280, 0.437),
                              "streaks": (0.263, 0.416), "mean": (0.326, 0.476)},
}


def pipeline_speed(predictor, images, repeats: int = 1) -> dict:
    """Seconds per image of ``predictor.predict`` (first image excluded: warm-up)."""
    predictor.predict(images[0])
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for image in images:
            predictor.predict(image)
            n += 1
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_second": n / seconds, "networks": predictor.n_networks}


def paper_size_speed(tmp: Path, n_images: int = 6) -> dict:
    """Untrained U + Link networks at 384x512 on generated 768x1024 images."""
    from medxfer.data.isic import load_isic
    from medxfer.data.synth.isic import generate_isic
    from medxfer.transfer.tatl_inference import TatlPredictor
    from medxfer.transfer.tatl import tatl_network

    root = generate_isic(tmp / "isic_large", year=2018, num_images=n_images + 1, size=(768, 1024), seed=5,
                         overwrite=True)
    images = [r["image"] for r in load_isic(root)]
    torch.manual_seed(0)
    def effb0(arch):
        return tatl_network(arch)

    targets = {a: [effb0("unet_effb0"), effb0("linknet_effb0")] for a in ATTRIBUTES_2018}
    predictor = TatlPredictor(targets, effb0("unet_effb0"), working_size=(384, 512),
                              union_networks=[effb0("unet_effb0"), effb0("linknet_effb0")])
    return {"working_size": [384, 512], "image_size": [768, 1024], **pipeline_speed(predictor, images)}


def union_scores(run_dir: Path, data: Path, folds: int, seed: int, run_folds=None) -> dict:
    """Union-map Jaccard per union source (``stage2`` / ``or_stage3``): TP / FP / FN pooled over each
    test fold's images at 256x256, mean over folds."""
    import numpy as np

    from medxfer.transforms.dermoscopy import resize_for_scoring, scoring_transforms
    from medxfer.workflows.tatl_skin import fold_predictor, tatl_datalists

    truth = scoring_transforms([f"attribute_{a}" for a in ATTRIBUTES_2018], label_key="label")
    per_fold = {"stage2": [], "or_stage3": []}
    for fold in range(folds) if run_folds is None else run_folds:
        test = tatl_datalists(data, fold, folds, seed, run_dir / "splits.json")["test"]
        predictor = fold_predictor(run_dir, fold, union="stage2")
        counts = {k: np.zeros(3) for k in per_fold}
        for record in test:
            pred = predictor.predict(record["image"])
            gt = np.asarray(truth(record)["label"]).any(axis=0)
            maps = {"stage2": resize_for_scoring(pred.union_probability, threshold=pred.threshold),
                    "or_stage3": resize_for_scoring(pred.probabilities, threshold=pred.threshold).any(axis=0)}
            for k, m in maps.items():
                counts[k] += [(m & gt).sum(), (m & ~gt).sum(), (~m & gt).sum()]
        for k, (tp, fp, fn) in counts.items():
            per_fold[k].append(float(tp / (tp + fp + fn)) if tp + fp + fn else float("nan"))
    return {k: {"jaccard_mean": float(np.nanmean(v)), "folds": v} for k, v in per_fold.items()}


def parameter_table(decoder_block: str) -> dict:
    """Parameters of the two TATL shapes as trained here, beside Table 7."""
    from medxfer.networks.effnet_unet import parameter_counts
    from medxfer.transfer.tatl import tatl_network

    paper = {"unet_effb0": 10_115_501, "linknet_effb0": 6_096_333}
    return {arch: {**parameter_counts(tatl_network(arch, decoder_block)), "table7": paper[arch]} for arch in paper}


def table(results: dict) -> list[dict]:
    """Rows attribute x configuration: ours (mean +- std over folds) beside the paper's numbers."""
    rows = []
    for name in (*ATTRIBUTES_2018, "mean"):
        row = {"attribute": name}
        for config in results:
            s = results[config]["summary"].get(name, {})
            row[f"{config}_jaccard"] = s.get("jaccard_mean")
            row[f"{config}_jaccard_std"] = s.get("jaccard_std")
            row[f"{config}_dice"] = s.get("dice_mean")
            row[f"{config}_dice_std"] = s.get("dice_std")
            row[f"paper_{config}_jaccard"], row[f"paper_{config}_dice"] = PAPER_TABLE3[config][name]
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/tatl")
    p.add_argument("--images", type=int, default=48, help="generated ISIC 2018 images")
    p.add_argument("--image-size", type=int, nargs=2, default=(96, 128), help="nominal generated image size H W")
    p.add_argument("--working-size", type=int, nargs=2, default=(96, 128), help="network input H W (multiples of 32)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--run-folds", type=int, nargs="+", default=None,
                   help="folds to train and score (default all); e.g. 0 for a short run")
    p.add_argument("--epochs", type=int, default=12, help="max epochs per network (early stopping patience 10)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-paper-size", action="store_true", help="skip the 384x512 speed measurement")
    p.add_argument("--decoder-block", choices=("paper", "linknet"), default="paper",
                   help="decoder stages: TATL section 4.1 (default) or medxfer's before issue 17")
    p.add_argument("--configs", nargs="+", choices=("stage3", "stages123"), default=("stage3", "stages123"))
    args = p.parse_args(argv)

    from medxfer.data.synth.isic import generate_isic
    from medxfer.jsonfile import json_safe, write_json
    from medxfer.workflows.bundle import run_bundle
    from medxfer.workflows.tatl_skin import fold_predictor, tatl_datalists

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out).absolute()
    data = out / "isic2018"
    if not data.exists():
        generate_isic(data, year=2018, num_images=args.images, size=tuple(args.image_size), seed=args.seed)
    common = {"data_root": str(data), "working_size": list(args.working_size), "n_folds": args.folds,
              "max_epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "device": "cpu",
              "decoder_block": args.decoder_block, "folds": args.run_folds}
    run_folds = list(range(args.folds)) if args.run_folds is None else list(args.run_folds)
    results, wall = {}, {}
    overlays = {"stage3": "ablation_stage3", "stages123": "ablation_stages123"}
    for config, overlay in ((c, overlays[c]) for c in args.configs):
        t0 = time.perf_counter()
        run_bundle("tatl_skin", ["tatl", overlay], quiet=True, output_dir=str(out / config), **common)
        wall[config] = time.perf_counter() - t0
        results[config] = json.loads((out / config / "cv_scores.json").read_text())

    last = out / args.configs[-1]
    test_images = [r["image"] for r in tatl_datalists(data, 0, args.folds, args.seed, last / "splits.json")["test"]]
    union = "stage2" if args.configs[-1] == "stages123" else "or_stage3"
    speed = {"trained_fold0": {"working_size": list(args.working_size), "union": union,
                               **pipeline_speed(fold_predictor(last, 0, union=union), test_images)}}
    if not args.skip_paper_size:
        speed["paper_size_untrained"] = paper_size_speed(out)
    report = {
        "data": {"generated": True, "year": 2018, "images": args.images, "image_size": list(args.image_size)},
        "budget": {"folds": args.folds, "run_folds": run_folds, "max_epochs": args.epochs, "patience": 10, "batch_size": args.batch_size,
                   "working_size": list(args.working_size), "imagenet_weights": None, "arches": ["unet_effb0", "linknet_effb0"],
                   "tatl_mode": "freeze", "decoder_block": args.decoder_block},
        "parameters": parameter_table(args.decoder_block),
        "union_map": (union_scores(out / "stages123", data, args.folds, args.seed, run_folds) if "stages123" in args.configs
                      else None),
        "wall_seconds": wall,
        "results": {c: {"summary": r["summary"], "folds": r["folds"]} for c, r in results.items()},
        "table": table(results),
        "paper_table3": PAPER_TABLE3,
        "inference": speed,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(out / "tatl_bench.json", report)
    json.dump(json_safe(report), sys.stdout, indent=1)
    print()
    return report


if __name__ == "__main__":
    main()
