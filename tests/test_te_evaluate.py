"""Ranking evaluation of transferability estimators (weighted tau, Pearson, Spearman, TIS)."""

import csv
import json
import math

import numpy as np
import pytest
import scipy.stats

from medxfer.transferability.evaluate import (
    evaluate_estimators,
    plot_scores,
    read_table,
    tis,
    weighted_tau,
    write_report,
)


def _table():
    rng = np.random.default_rng(0)
    rows = []
    for target in ("spleen", "liver"):
        dice = rng.uniform(0.4, 0.9, size=5)
        for m in range(5):
            rows.append({"target": target, "model": f"m{m}", "dice": float(dice[m]),
                         "ccfv": float(dice[m] + rng.normal(scale=0.1)), "logme": float(rng.normal())})
    return rows


def test_weighted_tau_equals_scipy_weightedtau_with_defaults():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=12), rng.normal(size=12)
    assert weighted_tau(x, y) == pytest.approx(scipy.stats.weightedtau(x, y).statistic, rel=1e-12)


def test_weighted_tau_drops_undefined_scores():
    x = np.array([0.3, np.nan, 0.1, 0.9, 0.5])
    y = np.array([0.5, 0.9, 0.2, 0.8, 0.6])
    keep = np.isfinite(x)
    assert weighted_tau(x, y) == pytest.approx(scipy.stats.weightedtau(x[keep], y[keep]).statistic)
    assert math.isnan(weighted_tau([np.nan, 1.0], [0.2, 0.3]))


def test_tis_on_hand_examples():
    assert tis([0.2, 0.9, 0.5], [0.8, 0.6, 0.75]) == pytest.approx(0.6 / 0.8)        # picks model 1
    assert tis([0.2, 0.5, 0.9], [0.8, 0.6, 0.8]) == pytest.approx(1.0)               # picks a best model
    assert tis([1.0, 1.0, 0.0], [0.4, 0.8, 1.0]) == pytest.approx(0.6)               # tie: mean Dice
    assert tis([np.nan, 0.1, 0.2], [0.9, 0.5, 0.6]) == pytest.approx(0.6 / 0.9)      # abstaining doesn't help
    assert math.isnan(tis([np.nan, np.nan], [0.9, 0.5]))


def test_evaluate_estimators_matches_direct_scipy_calls_per_target_and_mean():
    rows = _table()
    result = evaluate_estimators(rows)
    assert result["estimators"] == ["ccfv", "logme"] and result["targets"] == ["spleen", "liver"]
    for est in ("ccfv", "logme"):
        per = {}
        for target in ("spleen", "liver"):
            sel = [r for r in rows if r["target"] == target]
            s = np.array([r[est] for r in sel])
            d = np.array([r["dice"] for r in sel])
            per[target] = {
                "weighted_tau": scipy.stats.weightedtau(s, d).statistic,
                "pearson": scipy.stats.pearsonr(s, d).statistic,
                "spearman": scipy.stats.spearmanr(s, d).statistic,
                "tis": d[np.argmax(s)] / d.max(),
            }
            got = result["per_target"][target][est]
            for metric, value in per[target].items():
                assert got[metric] == pytest.approx(value, rel=1e-12), (target, est, metric)
            assert got["picked"] == sel[int(np.argmax(s))]["model"]
            assert got["n_models"] == got["n_scored"] == 5
        for metric in per["spleen"]:
            assert result["mean"][est][metric] == pytest.approx((per["spleen"][metric] + per["liver"][metric]) / 2)


def test_undefined_scores_are_excluded_and_never_crash():
    rows = _table()
    rows[1]["ccfv"] = float("nan")
    rows[3]["ccfv"] = None
    for r in rows:
        if r["target"] == "liver":
            r["leep"] = float("nan")       # undefined for the whole target
        else:
            r["leep"] = 1.0                # constant: correlations undefined
    del rows[0]["logme"]                   # missing = undefined
    result = evaluate_estimators(rows)
    spleen = [r for r in rows if r["target"] == "spleen"]
    keep = [i for i, r in enumerate(spleen) if r.get("ccfv") is not None and np.isfinite(r["ccfv"])]
    s = np.array([spleen[i]["ccfv"] for i in keep])
    d = np.array([spleen[i]["dice"] for i in keep])
    got = result["per_target"]["spleen"]["ccfv"]
    assert got["n_scored"] == 3 and got["n_models"] == 5
    assert got["pearson"] == pytest.approx(scipy.stats.pearsonr(s, d).statistic)
    assert got["weighted_tau"] == pytest.approx(scipy.stats.weightedtau(s, d).statistic)
    assert got["tis"] == pytest.approx(d[np.argmax(s)] / max(r["dice"] for r in spleen))
    assert result["per_target"]["spleen"]["logme"]["n_scored"] == 4
    leep = result["mean"]["leep"]
    assert math.isnan(leep["pearson"]) and leep["n_defined"]["pearson"] == 0
    assert leep["tis"] == pytest.approx(result["per_target"]["spleen"]["leep"]["tis"])   # mean over 1 target
    assert leep["n_defined"]["tis"] == 1
    assert math.isnan(result["per_target"]["liver"]["leep"]["tis"])


def test_duplicate_model_within_a_target_is_rejected():
    rows = _table()
    rows.append(dict(rows[0]))
    with pytest.raises(ValueError, match="twice"):
        evaluate_estimators(rows)


def test_report_is_strict_json_and_csv_with_target_and_mean_rows(tmp_path):
    rows = _table()
    rows[2]["logme"] = float("nan")
    for r in rows:
        r["leep"] = float("nan")
    result = evaluate_estimators(rows)
    paths = write_report(result, tmp_path / "report")

    def no_nan(token):
        raise AssertionError(f"non-standard JSON token {token}")

    data = json.loads(paths["json"].read_text(), parse_constant=no_nan)
    assert data["mean"]["leep"]["tis"] is None
    assert data["per_target"]["liver"]["ccfv"]["tis"] == pytest.approx(result["per_target"]["liver"]["ccfv"]["tis"])
    with paths["csv"].open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 * 3 + 3
    assert [r["scope"] for r in table].count("mean") == 3
    row = next(r for r in table if r["target"] == "spleen" and r["estimator"] == "ccfv")
    assert float(row["weighted_tau"]) == pytest.approx(result["per_target"]["spleen"]["ccfv"]["weighted_tau"])


def test_read_table_round_trips_a_csv_score_table(tmp_path):
    rows = _table()
    rows[4]["logme"] = float("nan")
    path = tmp_path / "scores.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["target", "model", "dice", "ccfv", "logme"])
        writer.writeheader()
        writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows)
    back = read_table(path)
    assert math.isnan(back[4]["logme"])
    a, b = evaluate_estimators(rows), evaluate_estimators(back)
    assert a["mean"]["ccfv"]["weighted_tau"] == pytest.approx(b["mean"]["ccfv"]["weighted_tau"])


def test_plot_scores_writes_a_nonempty_png(tmp_path):
    rows = _table()
    rows[0]["ccfv"] = float("nan")
    out = plot_scores(rows, tmp_path / "plots" / "scores.png", result=evaluate_estimators(rows))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
