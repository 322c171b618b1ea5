import json

import pytest

from medxfer.data.problems import DatasetError
from medxfer.data.splits import apply_split, load_splits, make_kfold_splits, save_splits


def test_every_case_is_validated_exactly_once_and_folds_differ_by_at_most_one():
    ids = [f"case_{i:03d}" for i in range(23)]
    splits = make_kfold_splits(ids, n_folds=5, seed=3)
    vals = [v for fold in splits for v in fold["val"]]
    assert sorted(vals) == ids
    sizes = [len(f["val"]) for f in splits]
    assert max(sizes) - min(sizes) <= 1
    for fold in splits:
        assert set(fold["train"]) | set(fold["val"]) == set(ids)
        assert not set(fold["train"]) & set(fold["val"])


def test_split_depends_on_seed_not_on_input_order():
    ids = [f"c{i}" for i in range(20)]
    assert make_kfold_splits(ids, seed=1) == make_kfold_splits(list(reversed(ids)), seed=1)
    assert make_kfold_splits(ids, seed=1) != make_kfold_splits(ids, seed=2)


def test_round_trip_is_nnunet_splits_final_format_and_refuses_to_overwrite(tmp_path):
    records = [{"id": f"c{i}", "image": f"/x/c{i}.nii.gz"} for i in range(10)]
    splits = make_kfold_splits(records, n_folds=5, seed=0)
    path = save_splits(splits, tmp_path / "splits_final.json")
    raw = json.loads(path.read_text())
    assert isinstance(raw, list) and set(raw[0]) == {"train", "val"}
    assert load_splits(path) == splits
    with pytest.raises(FileExistsError, match="splits_final.json"):
        save_splits(splits, path)
    train, val = apply_split(records, splits, 2)
    assert [r["id"] for r in val] == splits[2]["val"] and len(train) == 8


def test_bad_split_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json.*invalid JSON"):
        load_splits(bad)
    bad.write_text(json.dumps([{"train": ["a", "b"], "val": ["b"]}]))
    with pytest.raises(DatasetError, match="both in train and val"):
        load_splits(bad)


def test_too_few_cases_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot make 5 folds from 3 cases"):
        make_kfold_splits(["a", "b", "c"])


def test_holdout_split_is_seeded_disjoint_and_keeps_at_least_one_on_each_side():
    from medxfer.data.splits import holdout_split

    records = [{"id": f"c{i}"} for i in range(10)]
    kept, out = holdout_split(records, 0.2, seed=3, stream=1)
    assert len(out) == 2 and len(kept) == 8 and {r["id"] for r in kept}.isdisjoint(r["id"] for r in out)
    assert holdout_split(records, 0.2, seed=3, stream=1) == (kept, out)
    assert holdout_split(records, 0.2, seed=3, stream=2)[1] != out  # another stream, another draw
    assert len(holdout_split(records[:2], 0.01)[1]) == 1 and len(holdout_split(records[:2], 0.99)[0]) == 1
    with pytest.raises(ValueError, match="fraction must be in"):
        holdout_split(records, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        holdout_split(records[:1], 0.5)
