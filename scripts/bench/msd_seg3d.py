"""Benchmark of the ``msd_seg3d`` bundle on generated data (CPU by default); prints JSON.

What it measures, all in one process so the ratios compare like with like:

1. **train**: the UNet variant of ``configs/train.yaml`` + ``configs/adamw.yaml`` on a generated
   spleen-like task for a fixed budget of epochs -> best validation Dice (in-loop, resampled space), seconds per iteration,
   fraction of the step spent waiting for data, peak resident memory;
2. **evaluate**: ``configs/evaluate.yaml`` on the validation fold -> Dice / HD95 in the original space;
3. **inference**: seconds per volume of the ``configs/inference.yaml`` workflow (load, preprocess,
   Gaussian sliding window, invert, save NIfTI) and of its inferer alone, versus bare
   ``monai.inferers.sliding_window_inference`` with the same network, window, overlap and volume;
4. **transfer**: pretrain on a generated liver-like task into a model bank, then fine-tune on a
   few spleen-like cases with ``all_but_head`` and with ``scratch`` for the same short budget,
   for several seeds -> mean Dice of each (does a related pretrained model help?).

    python scripts/bench/msd_seg3d.py --out runs/bench/msd_seg3d [--quick]

``--quick`` shrinks every budget (a smoke run, numbers not meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _best_val_dice(workflow) -> float:
    return float(workflow.parser.get_parsed_content("validate#evaluator").state.best_metric)


def _common(args) -> dict:
    common = {"n_folds": args.n_folds, "cache_rate": 1.0, "device": args.device, "learning_rate": args.lr}
    if args.num_workers is not None:
        common["num_workers"] = args.num_workers
    return common


def bench_train(args, task: Path, out: Path) -> dict:
    from medxfer.workflows.bundle import run_bundle

    t0 = time.perf_counter()
    wf = run_bundle("msd_seg3d", ["train", "adamw"], output_dir=str(out), data_root=str(task), arch="unet",
                    max_epochs=args.epochs, val_interval=args.val_interval, seed=0, patch_size=args.patch,
                    **_common(args))
    wall = time.perf_counter() - t0
    timing = json.loads((out / "step_times.json").read_text())
    return {"epochs": args.epochs, "val_dice_best": _best_val_dice(wf), "wall_s": wall,
            "patch_size": wf.parser.get_parsed_content("roi_size"), **timing}


def bench_evaluate(args, task: Path, out: Path) -> dict:
    from medxfer.workflows.bundle import run_bundle

    run_bundle("msd_seg3d", ["train", "adamw", "evaluate"], output_dir=str(out), data_root=str(task), arch="unet",
               overwrite=True, patch_size=args.patch, **_common(args))
    summary = json.loads((out / "eval" / "metrics.json").read_text())["summary"]
    return {k: v["mean"] for k, v in summary.items()}


def bench_inference(args, task: Path, model_dir: Path, out: Path, repeats: int) -> dict:
    """Per-volume seconds: the inference workflow, its inferer, and bare sliding_window_inference."""
    import torch
    from monai.inferers import sliding_window_inference

    from medxfer.workflows.bundle import run_bundle

    images = sorted((task / "imagesTs").glob("*.nii.gz"))
    images = [p for p in images if not p.name.startswith("._")]
    common = dict(model_dir=str(model_dir), input_path=str(task), arch="unet", num_workers=0, device=args.device)
    wf = run_bundle("msd_seg3d", ["inference"], run=False, output_dir=str(out / "warmup"), **common)
    wf.run()  # warm-up: first allocations, file caches
    workflow_s = []
    for r in range(repeats):
        wf = run_bundle("msd_seg3d", ["inference"], run=False, output_dir=str(out / f"rep{r}"), **common)
        t0 = time.perf_counter()
        wf.run()
        workflow_s.append((time.perf_counter() - t0) / len(images))
    network = wf.parser.get_parsed_content("network").eval()
    inferer = wf.parser.get_parsed_content("inferer")
    preprocessing = wf.parser.get_parsed_content("preprocessing")
    device = torch.device(wf.parser.get_parsed_content("device"))
    volumes = [preprocessing({"image": str(p)})["image"][None].to(device) for p in images]
    roi = inferer.roi_size

    def bare_fn(v):
        return sliding_window_inference(v, roi, inferer.sw_batch_size, network, overlap=0.5, mode="gaussian")

    def seconds_per_volume(fn) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for v in volumes:
                fn(v)
        return (time.perf_counter() - t0) / len(volumes)

    with torch.no_grad():
        same = all(torch.allclose(inferer(v, network), bare_fn(v), atol=1e-5) for v in volumes)  # also the warm-up
    bare_s, ours_s = [], []
    for _ in range(max(repeats, 3)):  # interleaved, best of each: load changes hit both alike
        bare_s.append(seconds_per_volume(bare_fn))
        ours_s.append(seconds_per_volume(lambda v: inferer(v, network)))
    bare, ours = min(bare_s), min(ours_s)
    workflow = min(workflow_s)
    return {"volumes": len(images), "volume_shape_preprocessed": list(volumes[0].shape[2:]), "roi_size": list(roi),
            "bare_sliding_window_s_per_volume": bare, "bundle_inferer_s_per_volume": ours,
            "inferer_over_bare_ratio": ours / bare, "same_output_as_bare": bool(same),
            "workflow_s_per_volume": workflow, "workflow_over_bare_ratio": workflow / bare,
            "note": "workflow = load + orient + resample + normalise + sliding window + invert + save NIfTI"}


def bench_transfer(args, source: Path, target: Path, out: Path) -> dict:
    """Pretrain on ``source`` into a bank, fine-tune on ``target``: all_but_head vs scratch per seed."""
    from medxfer.transfer.bank import ModelBank
    from medxfer.workflows.bundle import run_bundle

    bank = out / "bank"
    t0 = time.perf_counter()
    run_bundle("msd_seg3d", ["train", "adamw", "pretrain"], output_dir=str(out / "pretrain"), source_roots=[str(source)],
               bank_root=str(bank), arch="unet", max_epochs=args.pretrain_epochs, val_interval=args.pretrain_epochs,
               patch_size=args.transfer_patch, seed=0, **_common(args))
    pretrain_s = time.perf_counter() - t0
    entry = ModelBank.open(bank).names()[-1]
    results: dict[str, list[float]] = {"all_but_head": [], "scratch": []}
    for seed in range(args.seeds):
        for mode in results:
            wf = run_bundle("msd_seg3d", ["train", "adamw", "finetune"], output_dir=str(out / f"ft_{mode}_s{seed}"),
                            data_root=str(target), bank_root=str(bank), bank_entry=entry, transfer_mode=mode,
                            max_epochs=args.finetune_epochs, val_interval=min(5, args.finetune_epochs), patch_size=args.transfer_patch,
                            seed=seed, resume=False, **{**_common(args), "n_folds": args.finetune_folds})
            results[mode].append(_best_val_dice(wf))
    mean = {m: sum(v) / len(v) for m, v in results.items()}
    return {"source": source.name, "target": target.name, "bank_entry": entry, "pretrain_epochs": args.pretrain_epochs,
            "pretrain_s": pretrain_s, "finetune_epochs": args.finetune_epochs, "seeds": args.seeds,
            "dice_per_seed": results, "dice_mean": mean,
            "all_but_head_minus_scratch": mean["all_but_head"] - mean["scratch"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/msd_seg3d")
    p.add_argument("--device", default="cpu", help="cpu (default, the numbers in the README) or cuda")
    p.add_argument("--epochs", type=int, default=150, help="training budget of the spleen-like UNet run")
    p.add_argument("--patch", type=int, nargs=3, default=[48, 48, 16],
                   help="training patch (voxels); the planned patch covers the whole small volume")
    p.add_argument("--val-interval", type=int, default=25)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (configs/adamw.yaml), poly decay")
    p.add_argument("--num-training", type=int, default=12)
    p.add_argument("--n-folds", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=None, help="default: the bundle's (0 on CPU)")
    p.add_argument("--pretrain-epochs", type=int, default=150)
    p.add_argument("--finetune-epochs", type=int, default=40)
    p.add_argument("--finetune-folds", type=int, default=3, help="fine-tuning trains on (1 - 1/folds) of the target cases")
    p.add_argument("--finetune-cases", type=int, default=6, help="labelled target cases for fine-tuning (few-shot)")
    p.add_argument("--transfer-patch", type=int, nargs=3, default=[48, 48, 16])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny budgets: smoke test only")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.val_interval, args.num_training, args.pretrain_epochs = 2, 1, 6, 2
        args.finetune_epochs, args.seeds, args.repeats, args.n_folds = 1, 1, 1, 3
    os.environ.setdefault("MPLCONFIGDIR", str(Path(args.out) / ".cache" / "mpl"))
    from medxfer.data.synth.msd import generate_msd_task

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"
    t0 = time.perf_counter()
    spleen = generate_msd_task(data, "spleen", num_training=args.num_training, num_test=2, seed=0)
    liver = generate_msd_task(data, "liver", num_training=args.num_training, num_test=0, seed=0)
    few = generate_msd_task(data / "few", "spleen", num_training=args.finetune_cases, num_test=0, seed=7)
    result = {"benchmark": "msd_seg3d", "device": args.device, "torch_threads": None, "python": platform.python_version(),
              "generate_s": time.perf_counter() - t0}
    import torch

    result["torch_threads"] = torch.get_num_threads()
    result["train"] = bench_train(args, spleen, out / "train")
    result["evaluate"] = bench_evaluate(args, spleen, out / "train")
    result["inference"] = bench_inference(args, spleen, out / "train", out / "inference", args.repeats)
    result["transfer"] = bench_transfer(args, liver, few, out / "transfer")
    result["peak_rss_mib"] = _peak_rss_mib()
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["targets"] = {"val_dice_best > 0.8": result["train"]["val_dice_best"] > 0.8,
                         "all_but_head > scratch (mean over seeds)": result["transfer"]["all_but_head_minus_scratch"] > 0}
    text = json.dumps(result, indent=2)
    (out / "result.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
