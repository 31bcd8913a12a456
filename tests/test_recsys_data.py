"""Session protocol, cache, malformed logs, the real datasets, the CLI and a tiny training run."""

import json

import numpy as np
import pytest
import torch

from aloe import AloeError
from aloe.cli import main
from aloe.recsys.data import (
    PROTOCOLS,
    ClickLog,
    Protocol,
    apply_protocol,
    load_dataset,
    read_diginetica,
    read_movielens,
    read_yoochoose,
)

torch.set_num_threads(1)
DAY = 86400.0


def _log(rows):
    seq, item, time = zip(*rows)
    return ClickLog(np.array(seq), np.array(item), np.array(time, dtype=np.float64))


def test_session_protocol_by_hand():
    rows = []
    t0 = 1_000_000.0
    # items 10, 11, 12 are frequent; 99 is rare; session 5 has length 1; session 4 ends in the last day
    for s, items, day in [(1, [10, 11, 12], 0), (2, [11, 10, 99], 1), (3, [12, 12, 11], 2), (6, [10, 12], 3),
                          (4, [11, 10, 12, 13], 9), (5, [10], 9)]:
        rows += [(s, it, t0 + day * DAY + k) for k, it in enumerate(items)]
    # shuffle file order: the protocol sorts by time
    rows = rows[::-1]
    data = apply_protocol("t", _log(rows), Protocol(split="session-tail", test_days=1.0, min_support=2))
    assert data.n_items == 3 and data.item_raw.tolist() == [10, 11, 12]
    assert [s.tolist() for s in data.train_sequences()] == [[0, 1, 2], [1, 0], [2, 2, 1], [0, 2]]
    assert [s.tolist() for s in data.test_sequences()] == [[1, 0, 2]]  # 13 is rare, dropped
    examples = [(p.tolist(), t) for p, t in data.prefix_examples("test")]
    assert examples == [([1], 0), ([1, 0], 2)]
    assert len(list(data.prefix_examples("train"))) == data.n_examples("train") == 2 + 1 + 2 + 1
    assert data.item_counts().tolist() == [3, 3, 4]


def test_test_items_unseen_in_training_are_removed():
    t0 = 5_000_000.0
    rows = [(1, 1, t0), (1, 2, t0 + 1), (2, 2, t0 + 2), (2, 1, t0 + 3),
            (3, 1, t0 + 5 * DAY), (3, 7, t0 + 5 * DAY + 1), (3, 7, t0 + 5 * DAY + 2), (3, 2, t0 + 5 * DAY + 3),
            (4, 7, t0 + 5 * DAY + 4), (4, 7, t0 + 5 * DAY + 5)]
    data = apply_protocol("t", _log(rows), Protocol(split="session-tail", test_days=1.0, min_support=1))
    assert data.item_raw.tolist() == [1, 2]
    assert [s.tolist() for s in data.test_sequences()] == [[0, 1]]


def test_time_quantile_protocol_keeps_history():
    rows = [(1, i % 3, float(t)) for i, t in enumerate(range(10))] + [(2, 1, 3.5), (2, 2, 20.0), (2, 0, 21.0)]
    data = apply_protocol("m", _log(rows), Protocol(split="time-quantile", quantile=0.7, min_support=1))
    cutoff = float(np.quantile([r[2] for r in rows], 0.7))
    assert data.stats["cutoff_unix"] == cutoff
    seqs = data.test_sequences()
    # user 1's events after the cut are targets, predicted from the whole history
    for s, first in zip(seqs, data.test_first):
        assert 1 <= first < len(s)
    assert sum(len(s) - f for s, f in zip(seqs, data.test_first)) == sum(1 for r in rows if r[2] > cutoff)


@pytest.mark.parametrize("reader,text,message", [
    (read_yoochoose, "SessionId\tItemId\n1\t2\n", "row 1: missing column(s) Time"),
    (read_yoochoose, "SessionId\tItemId\tTime\n1\t2\t3.0\n1\t3\tyesterday\n", "row 3: cannot parse Time 'yesterday'"),
    (read_yoochoose, "SessionId\tItemId\tTime\n1\t2\t3.0\n1\t3\n", "row 3: 2 fields, expected 3"),
    (read_yoochoose, "SessionId\tItemId\tTime\n1\tx\t3.0\n", "row 2: cannot parse ItemId 'x'"),
    (read_yoochoose, "SessionId\tItemId\tTime\n1\t4\tnan\n", "row 2: cannot parse Time 'nan'"),
    (read_yoochoose, "", "empty click log"),
    (read_yoochoose, "SessionId\tItemId\tTime\n", "empty click log"),
    (read_diginetica, "session_id;user_id;item_id;timeframe;eventdate\n1;NA;5;10;2016-13-01\n",
     "row 2: cannot parse eventdate '2016-13-01'"),
    (read_movielens, "user_id:token\titem_id:token\trating:float\n1\t2\t3\n", "missing column(s) timestamp:float"),
])
def test_malformed_logs_name_file_and_row(tmp_path, reader, text, message):
    path = tmp_path / "log.txt"
    path.write_text(text)
    with pytest.raises(AloeError) as err:
        reader(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_malformed_log_leaves_cache_clean(tmp_path, monkeypatch, capsys):
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    (data_dir / "recsys").mkdir(parents=True)
    bad = data_dir / "recsys" / "diginetica_sample_train-item-views.csv"
    bad.write_text("session_id;user_id;item_id;timeframe;eventdate\n1;NA;5;10;2016-01-01\n1;NA;6;oops;2016-01-01\n")
    monkeypatch.setenv("ALOE_DATA", str(data_dir))
    monkeypatch.setenv("ALOE_CACHE", str(cache))
    assert main(["recsys", "train", "--data", "diginetica", "--model", "vector", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aloe: error: ") and f"{bad}, row 3" in err[0]
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
    assert main(["recsys", "train", "--data", "netflix", "--model", "vector"]) == 2
    assert capsys.readouterr().err.strip() == ("aloe: error: unknown dataset 'netflix'; choose one of diginetica, "
                                              "yoochoose, ml100k")
    assert main(["recsys", "train", "--data", "diginetica", "--model", "mlp"]) == 2
    assert "unknown model 'mlp'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_real_datasets_follow_the_protocol(name, tmp_path):
    data = load_dataset(name, cache=tmp_path)
    train, test = data.train_sequences(), data.test_sequences()
    assert all(len(s) >= 2 for s in train) and all(len(s) >= 2 for s in test)
    assert data.train_items.max() < data.n_items and data.test_items.max() < data.n_items
    assert data.item_counts().min() >= 1
    assert data.stats["test_examples"] == sum(1 for _ in data.prefix_examples("test")) > 0
    # cached: a second load reads the published folder and gives identical arrays
    folders = list((tmp_path / "recsys" / "data").iterdir())
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    again = load_dataset(name, cache=tmp_path)
    assert np.array_equal(again.test_items, data.test_items) and again.stats == data.stats


def test_yoochoose_split_is_the_last_day(tmp_path):
    data = load_dataset("yoochoose", cache=tmp_path)
    assert data.stats["test_sequences"] > 3000 and data.stats["items"] > 2000


def test_cli_train_json_and_interests(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALOE_CACHE", str(tmp_path))
    assert main(["recsys", "train", "--data", "diginetica", "--model", "matrix", "--epochs", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"recall@20", "mrr@20", "params"} <= set(out)
    assert 0.0 <= out["mrr@20"] <= out["recall@20"] <= 1.0 and out["params"] > 0
    assert main(["recsys", "interests", "--data", "diginetica", "--session", "0", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["interests"] and all(len(i["items"]) == 10 for i in shown["interests"])
    assert main(["recsys", "interests", "--data", "diginetica", "--seed", "9"]) == 2
    assert "no trained matrix model" in capsys.readouterr().err


def test_tiny_training_beats_popularity(tmp_path):
    from aloe.recsys.train import fit_and_evaluate

    pop = fit_and_evaluate("yoochoose", "pop", cache=tmp_path, save=False)
    vec = fit_and_evaluate("yoochoose", "vector", epochs=1, cache=tmp_path, save=False)
    mat = fit_and_evaluate("yoochoose", "matrix", epochs=1, cache=tmp_path, save=False)
    assert pop["params"] == 0
    assert vec["recall@20"] > pop["recall@20"] + 0.1
    assert mat["recall@20"] > pop["recall@20"] + 0.1


def test_movielens_item_metadata():
    from aloe.recsys.data import item_titles, movielens_genres

    titles, genres = item_titles("ml100k"), movielens_genres()
    assert len(titles) == len(genres) == 1682
    assert titles[1] == "Toy Story" and genres[1] == {"Animation", "Children's", "Comedy"}
    assert item_titles("yoochoose") == {}
