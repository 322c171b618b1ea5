"""Benchmark of scoring a *mixed* model bank (issue 14); prints JSON.

One bank holding what a researcher would import: two MONAI model-zoo bundles (UNet, SegResNet;
zoo layout, their own inference preprocessing), an nnU-Net v2 model trained by nnU-Net itself
(its own preprocessing) and a plain UNet checkpoint (the target's plans). Every entry is scored
with every estimator on a generated spleen target (``score_target``: each distinct preprocessing
prepared once), then plain ``network(window)`` calls run over exactly the same windows of the same
prepared cases, no hooks, no sampling -> ``scoring_forward_over_bare`` (target <= 1.3, as for the
UNet/UNETR bank of ``scripts/bench/transferability.py``). Preparing the target per preprocessing
is reported apart (``prepare_s``).

    python scripts/bench/mixed_bank.py [--out runs/bench/mixed_bank]   # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transferability import bare_forward_seconds  # noqa: E402  (the same bare-forward loop as the UNet/UNETR bench)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/mixed_bank")
    p.add_argument("--cases", type=int, default=6, help="labelled target cases")
    args = p.parse_args(argv)

    from medxfer.data.synth.msd import generate_msd_task
    from medxfer.data.synth.zoo_bundle import write_zoo_bundle
    from medxfer.networks import build_network
    from medxfer.planning.nnunet_model import train_nnunet_model
    from medxfer.transfer.bank import ModelBank
    from medxfer.transfer.bank_import import import_bundle, import_checkpoint, import_nnunet
    from medxfer.transferability.features import SamplingConfig
    from medxfer.transferability.score import DEFAULT_ESTIMATORS, score_target, task_target
    from medxfer.transforms.preprocessing import preprocessing_key
    from medxfer.workflows.msd_seg3d import task_plans

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = dict(shape=(48, 48, 16), spacing=(6.4, 6.4, 18.0), num_test=0, seed=3)
    data = out / "data"
    target = data / "Task09_Spleen"
    if not (target / "dataset.json").is_file():
        generate_msd_task(data, "spleen", num_training=args.cases, **tiny)
    source = data / "Task03_Liver"
    if not (source / "dataset.json").is_file():
        generate_msd_task(data, "liver", num_training=5, **tiny)
    bank_root = out / "bank"
    t0 = time.perf_counter()
    if not (bank_root / "bank.yaml").is_file():
        for i, (net, roi) in enumerate((("unet", [64, 64, 32]), ("segresnet", [64, 64, 32]))):
            write_zoo_bundle(out / f"zoo_{net}", net, out_channels=2, roi_size=roi, pixdim=(6.4, 6.4, 9.0), seed=i,
                             overwrite=True)
            import_bundle(bank_root, out / f"zoo_{net}", name=f"zoo_{net}")
        folder = train_nnunet_model(source, out / "nnunet", overwrite=True)
        import_nnunet(bank_root, folder, name="nnunet_liver")
        torch.manual_seed(0)
        kw = {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2}
        torch.save(build_network("unet", 1, 3, [64, 64, 32], **kw).state_dict(), out / "published.pt")
        import_checkpoint(bank_root, out / "published.pt", "unet", kw, name="published_unet", patch_size=[64, 64, 32])
    t_bank = time.perf_counter() - t0

    plans = task_plans(target)
    scoring_target = task_target(target, plans)
    bank = ModelBank.open(bank_root)
    entries = bank.names()
    t0 = time.perf_counter()
    rows = score_target(bank_root, scoring_target, DEFAULT_ESTIMATORS, SamplingConfig(seed=0), device="cpu",
                        progress=False)
    t_score = time.perf_counter() - t0
    # the same prepared cases, once per distinct preprocessing (timed apart)
    t0 = time.perf_counter()
    prepared = {}
    for name in entries:
        entry = bank.get(name)
        key = preprocessing_key(entry.preprocessing)
        if key not in prepared:
            prepared[key] = scoring_target.cases if key == "target_plans" else \
                scoring_target.prepare(entry.preprocessing, bank.root)
    t_prepare = time.perf_counter() - t0
    cases = {n: prepared[preprocessing_key(bank.get(n).preprocessing)] for n in entries}
    bare = bare_forward_seconds(bank_root, cases, entries)
    per_model = [{"model": r["model"], "arch": r["arch"], "kind": bank.get(r["model"]).provenance.get("kind"),
                  "preprocessing": bank.get(r["model"]).preprocessing_kind, "forward_s": r["seconds_forward"],
                  "bare_forward_s": bare[r["model"]], "ratio": r["seconds_forward"] / bare[r["model"]],
                  "estimators_s": r["seconds_estimators"]} for r in rows]
    t_forward, t_bare = sum(r["seconds_forward"] for r in rows), sum(bare.values())
    result = {"benchmark": "mixed_bank", "device": "cpu", "torch_threads": torch.get_num_threads(),
              "models": len(rows), "kinds": sorted({m["kind"] for m in per_model}),
              "preprocessings": len(prepared), "target_cases": len(scoring_target.cases),
              "bank_build_s": t_bank, "scoring_s": t_score, "prepare_s": t_prepare,
              "scoring_forward_s": t_forward, "bare_forward_s": t_bare, "scoring_forward_over_bare": t_forward / t_bare,
              "worst_model_ratio": max(m["ratio"] for m in per_model), "per_model": per_model}
    result["checks"] = {"scoring forward / bare <= 1.3": result["scoring_forward_over_bare"] <= 1.3}
    text = json.dumps(result, indent=2)
    (out / "result.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
