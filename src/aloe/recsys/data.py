"""Click logs and the standard session protocol (NARM / STAMP / SR-GNN), cached under the cache root.

Protocol, the same code for every dataset:

1. read the log (one row per click or rating), order each sequence's events by time (file order breaks ties);
2. drop sequences of length 1, drop items seen fewer than ``min_support`` times, drop sequences left with length < 2;
3. split by time: YooChoose -- sessions that end in the last day are test, Diginetica -- the last week; MovieLens-100K
   (one time-ordered sequence per user) -- the events after the 90th percentile of all timestamps are test targets,
   predicted from the user's whole earlier history;
4. test events whose item never occurs in training are removed, test sequences left with length < 2 are dropped;
5. prefix augmentation: a sequence ``s`` yields the examples ``(s[:i], s[i])`` for every target position ``i``.

Dense item ids ``0 .. n_items-1`` number the training items (sorted by raw id); ``n_items`` is the padding id.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aloe import AloeError
from aloe.assets.cache import atomic_directory, atomic_write_json, cache_root
from aloe.assets.corpus import data_root

PROTOCOL_VERSION = 1
DATASETS = ("diginetica", "yoochoose", "ml100k")
DAY = 86400.0


@dataclass
class ClickLog:
    """Parsed events: ``seq`` (sequence key as int code), ``item`` (raw id), ``time`` (seconds), in file order."""

    seq: np.ndarray
    item: np.ndarray
    time: np.ndarray


@dataclass
class Protocol:
    split: str  # "session-tail" (whole sessions that end in the last `test_days`) or "time-quantile"
    test_days: float = 1.0
    quantile: float = 0.9
    min_support: int = 5


PROTOCOLS = {
    "diginetica": Protocol(split="session-tail", test_days=7.0),
    "yoochoose": Protocol(split="session-tail", test_days=1.0),
    "ml100k": Protocol(split="time-quantile", quantile=0.9),
}


# --------------------------------------------------------------------------------------------------------- reading


def _parse_date(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp()


def _read_rows(path: Path, delimiter: str, columns: dict[str, str],
               parsers: dict[str, Callable[[str], float]]) -> dict[str, list]:
    """Read a delimited log with a header; ``columns`` maps a role to its header name, ``parsers`` a role to a
    converter. Any problem is one AloeError naming the file and the row (1-based line number, header = row 1)."""
    path = Path(path)
    if not path.is_file():
        raise AloeError(f"click log {path} is missing (set ALOE_DATA to the folder holding recsys/)")
    out: dict[str, list] = {role: [] for role in columns}
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise AloeError(f"{path}: empty click log (no header row)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise AloeError(f"{path}, row 1: unreadable header ({exc})") from None
        header = [h.strip() for h in header]
        missing = [name for name in columns.values() if name not in header]
        if missing:
            raise AloeError(f"{path}, row 1: missing column(s) {', '.join(missing)} "
                            f"(header has {', '.join(header) or 'nothing'})")
        where = {role: header.index(name) for role, name in columns.items()}
        row_no = 1
        try:
            for row_no, row in enumerate(reader, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise AloeError(f"{path}, row {row_no}: {len(row)} fields, expected {len(header)}")
                for role, idx in where.items():
                    text = row[idx].strip()
                    try:
                        out[role].append(parsers[role](text))
                    except (ValueError, OverflowError):
                        raise AloeError(f"{path}, row {row_no}: cannot parse {columns[role]} {text!r}") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise AloeError(f"{path}, row {row_no + 1}: unreadable row ({exc})") from None
    if not out[next(iter(columns))]:
        raise AloeError(f"{path}: empty click log (header only, no rows)")
    return out


def _finite(parse: Callable[[str], float]) -> Callable[[str], float]:
    def checked(text: str) -> float:
        value = parse(text)
        if not np.isfinite(value):
            raise ValueError(text)
        return value

    return checked


def read_diginetica(path: Path) -> ClickLog:
    """``session_id;user_id;item_id;timeframe;eventdate``: time = event date + timeframe (ms into the session)."""
    rows = _read_rows(path, ";", {"seq": "session_id", "item": "item_id", "frame": "timeframe", "date": "eventdate"},
                      {"seq": int, "item": int, "frame": _finite(float), "date": _parse_date})
    time = np.asarray(rows["date"], dtype=np.float64) + np.asarray(rows["frame"], dtype=np.float64) / 1000.0
    return ClickLog(np.asarray(rows["seq"], np.int64), np.asarray(rows["item"], np.int64), time)


def read_yoochoose(path: Path) -> ClickLog:
    """``SessionId<TAB>ItemId<TAB>Time`` (unix seconds)."""
    rows = _read_rows(path, "\t", {"seq": "SessionId", "item": "ItemId", "time": "Time"},
                      {"seq": int, "item": int, "time": _finite(float)})
    return ClickLog(np.asarray(rows["seq"], np.int64), np.asarray(rows["item"], np.int64),
                    np.asarray(rows["time"], np.float64))


def read_movielens(path: Path) -> ClickLog:
    """RecBole atomic file ``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float``; one sequence
    per user."""
    rows = _read_rows(path, "\t", {"seq": "user_id:token", "item": "item_id:token", "time": "timestamp:float"},
                      {"seq": int, "item": int, "time": _finite(float)})
    return ClickLog(np.asarray(rows["seq"], np.int64), np.asarray(rows["item"], np.int64),
                    np.asarray(rows["time"], np.float64))


def movielens_dir() -> Path:
    """``recbole/dataset_example/ml-100k`` inside the installed recbole wheel, located without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise AloeError("package recbole is not installed (MovieLens-100K ships in its wheel); install it with "
                        "'pip install --no-deps recbole==1.2.1' (make setup does this)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise AloeError(f"package recbole is installed but {folder / 'ml-100k.inter'} is missing; reinstall it")
    return folder


def source_files(name: str) -> list[Path]:
    folder = data_root() / "recsys"
    if name == "diginetica":
        return [folder / "diginetica_sample_train-item-views.csv"]
    if name == "yoochoose":
        return [folder / "yoochoose-clicks-100k_train_full.txt", folder / "yoochoose-clicks-100k_test.txt"]
    if name == "ml100k":
        return [movielens_dir() / "ml-100k.inter"]
    raise AloeError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def read_log(name: str, files: list[Path] | None = None) -> ClickLog:
    files = source_files(name) if files is None else [Path(f) for f in files]
    reader = {"diginetica": read_diginetica, "yoochoose": read_yoochoose, "ml100k": read_movielens}[name]
    logs = [reader(f) for f in files]
    return ClickLog(*(np.concatenate([getattr(g, a) for g in logs]) for a in ("seq", "item", "time")))


# -------------------------------------------------------------------------------------------------------- protocol


@dataclass
class SessionData:
    """Processed sequences as flat arrays + offsets (dense item ids). ``test_first[j]`` is the first target position
    of test sequence ``j`` (1 for sessions; for MovieLens the position of the first event after the cut)."""

    name: str
    n_items: int
    item_raw: np.ndarray
    train_items: np.ndarray
    train_offsets: np.ndarray
    test_items: np.ndarray
    test_offsets: np.ndarray
    test_first: np.ndarray
    stats: dict = field(default_factory=dict)

    @staticmethod
    def _split(items: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
        return [items[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]

    def train_sequences(self) -> list[np.ndarray]:
        return self._split(self.train_items, self.train_offsets)

    def test_sequences(self) -> list[np.ndarray]:
        return self._split(self.test_items, self.test_offsets)

    def item_counts(self) -> np.ndarray:
        return np.bincount(self.train_items, minlength=self.n_items)

    def prefix_examples(self, split: str = "test") -> Iterator[tuple[np.ndarray, int]]:
        """Prefix augmentation: ``(s[:i], s[i])`` for every target position ``i`` of every sequence."""
        if split == "train":
            seqs, firsts = self.train_sequences(), np.ones(len(self.train_offsets) - 1, np.int64)
        else:
            seqs, firsts = self.test_sequences(), self.test_first
        for s, first in zip(seqs, firsts):
            for i in range(int(first), len(s)):
                yield s[:i], int(s[i])

    def holdout(self, fraction: float, seed: int = 0, max_sequences: int | None = None) -> SessionData:
        """A tuning split of the training data: a random ``fraction`` of the training sequences (at most
        ``max_sequences``) becomes the test split, whole (every position after the first is a target), and the rest
        the training split. The test split of ``self`` is not used, so hyper-parameters chosen on it never saw it."""
        seqs = self.train_sequences()
        if not 0.0 < fraction < 1.0:
            raise AloeError(f"the held-out fraction must be in (0, 1), got {fraction}")
        n_val = max(1, int(round(len(seqs) * fraction)))
        if max_sequences is not None:
            n_val = min(n_val, max_sequences)
        if len(seqs) < 2 or n_val >= len(seqs):
            raise AloeError(f"{self.name}: {len(seqs)} training sequences are too few to hold {n_val} out")
        held = np.zeros(len(seqs), bool)
        held[np.random.default_rng(seed).choice(len(seqs), n_val, replace=False)] = True
        fit_items, fit_offsets = _pack([s for s, h in zip(seqs, held) if not h])
        val_items, val_offsets = _pack([s for s, h in zip(seqs, held) if h])
        return SessionData(name=f"{self.name}/holdout", n_items=self.n_items, item_raw=self.item_raw,
                           train_items=fit_items, train_offsets=fit_offsets, test_items=val_items,
                           test_offsets=val_offsets, test_first=np.ones(n_val, np.int64),
                           stats={"holdout_of": self.name, "fraction": fraction, "seed": seed,
                                  "train_sequences": len(seqs) - n_val, "validation_sequences": n_val})

    def n_examples(self, split: str) -> int:
        if split == "train":
            return int(len(self.train_items) - (len(self.train_offsets) - 1))
        lengths = np.diff(self.test_offsets)
        return int((lengths - self.test_first).sum())


def _group(log: ClickLog) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort events by (sequence, time, file order); return sorted seq codes, items, times and sequence offsets."""
    order = np.lexsort((np.arange(len(log.seq)), log.time, log.seq))
    seq, item, time = log.seq[order], log.item[order], log.time[order]
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    return seq, item, time, np.r_[starts, len(seq)]


def _filter(item: np.ndarray, time: np.ndarray, offsets: np.ndarray, min_support: int):
    """Drop length-1 sequences, items with < min_support events, then sequences left shorter than 2."""
    lengths = np.diff(offsets)
    keep = np.repeat(lengths >= 2, lengths)
    counts: dict[int, int] = {}
    uniq, cnt = np.unique(item[keep], return_counts=True)
    counts = dict(zip(uniq.tolist(), cnt.tolist()))
    frequent = np.array([counts.get(int(i), 0) >= min_support for i in item], dtype=bool)
    keep &= frequent
    seq_id = np.repeat(np.arange(len(lengths)), lengths)
    new_len = np.bincount(seq_id[keep], minlength=len(lengths))
    keep &= np.repeat(new_len >= 2, lengths)
    seq_id, item, time = seq_id[keep], item[keep], time[keep]
    starts = np.flatnonzero(np.r_[True, seq_id[1:] != seq_id[:-1]]) if len(seq_id) else np.zeros(0, np.int64)
    return item, time, np.r_[starts, len(item)].astype(np.int64)


def _pack(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    items = np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, np.int64)
    return items, np.r_[0, np.cumsum(lengths)].astype(np.int64)


def apply_protocol(name: str, log: ClickLog, protocol: Protocol, source: str = "") -> SessionData:
    n_events = len(log.seq)
    _, item, time, offsets = _group(log)
    item, time, offsets = _filter(item, time, offsets, protocol.min_support)
    if len(offsets) < 2:
        raise AloeError(f"{source or name}: no sequence of length >= 2 is left after dropping items seen fewer than "
                        f"{protocol.min_support} times")
    seqs = [item[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    times = [time[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    train_raw: list[np.ndarray] = []
    test_raw: list[tuple[np.ndarray, int]] = []
    if protocol.split == "session-tail":
        end = np.array([t[-1] for t in times])
        cutoff = float(end.max()) - protocol.test_days * DAY
        for s, e in zip(seqs, end):
            (test_raw.append((s, 1)) if e > cutoff else train_raw.append(s))
    else:
        cutoff = float(np.quantile(time, protocol.quantile))
        for s, t in zip(seqs, times):
            n_before = int(np.searchsorted(t, cutoff, side="right"))
            if n_before >= 2:
                train_raw.append(s[:n_before])
            if n_before < len(s):
                test_raw.append((s, max(1, n_before)))
    if not train_raw:
        raise AloeError(f"{source or name}: the time split leaves no training sequence")
    vocab = np.unique(np.concatenate(train_raw))
    dense = {int(r): i for i, r in enumerate(vocab.tolist())}
    train = [np.array([dense[int(x)] for x in s], np.int64) for s in train_raw]
    test: list[np.ndarray] = []
    first: list[int] = []
    for s, f in test_raw:
        known = np.array([int(x) in dense for x in s], dtype=bool)
        kept = np.array([dense[int(x)] for x in s[known]], np.int64)
        f_new = max(1, int(known[:f].sum()))
        if len(kept) >= 2 and f_new < len(kept):
            test.append(kept)
            first.append(f_new)
    if not test:
        raise AloeError(f"{source or name}: the time split leaves no test sequence with a known item")
    train_items, train_offsets = _pack(train)
    test_items, test_offsets = _pack(test)
    data = SessionData(name=name, n_items=len(vocab), item_raw=vocab.astype(np.int64), train_items=train_items,
                       train_offsets=train_offsets, test_items=test_items, test_offsets=test_offsets,
                       test_first=np.array(first, np.int64))
    data.stats = {
        "events_read": n_events,
        "items": data.n_items,
        "train_sequences": len(train),
        "test_sequences": len(test),
        "train_events": int(len(train_items)),
        "train_examples": data.n_examples("train"),
        "test_examples": data.n_examples("test"),
        "split": protocol.split,
        "cutoff_unix": cutoff,
        "min_support": protocol.min_support,
    }
    return data


# ----------------------------------------------------------------------------------------------------------- cache


def _fingerprint(name: str, files: list[Path], protocol: Protocol) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"name": name, "version": PROTOCOL_VERSION, "protocol": protocol.__dict__}).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


_ARRAYS = ("item_raw", "train_items", "train_offsets", "test_items", "test_offsets", "test_first")


def load_dataset(name: str, *, cache: Path | None = None, files: list[Path] | None = None,
                 protocol: Protocol | None = None, use_cache: bool = True) -> SessionData:
    """The processed dataset ``name``, built from its click log(s) and cached atomically under
    ``<cache>/recsys/data/``; a cached build is reused while the source files and the protocol are unchanged."""
    if name not in DATASETS:
        raise AloeError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    files = source_files(name) if files is None else [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise AloeError(f"click log {f} is missing (set ALOE_DATA to the folder holding recsys/)")
    protocol = protocol or PROTOCOLS[name]
    folder = (cache or cache_root()) / "recsys" / "data" / f"{name}-{_fingerprint(name, files, protocol)}"
    if use_cache and (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "arrays.npz") as z:
            arrays = {k: z[k] for k in _ARRAYS}
        return SessionData(name=name, n_items=int(meta["n_items"]), stats=meta["stats"], **arrays)
    data = apply_protocol(name, read_log(name, files), protocol, source=", ".join(str(f) for f in files))
    if use_cache:
        with atomic_directory(folder, overwrite=True) as tmp:
            np.savez(tmp / "arrays.npz", **{k: getattr(data, k) for k in _ARRAYS})
            atomic_write_json(tmp / "meta.json", {"n_items": data.n_items, "stats": data.stats,
                                                   "files": [str(f) for f in files]})
    return data


def _movielens_items() -> list[tuple[int, str, frozenset[str]]]:
    """(raw item id, title, genres) from ``ml-100k.item`` in the recbole wheel."""
    path = movielens_dir() / "ml-100k.item"
    out: list[tuple[int, str, frozenset[str]]] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = [h.split(":")[0] for h in next(reader, [])]
        if not {"item_id", "movie_title", "class"} <= set(header):
            raise AloeError(f"{path}, row 1: missing column(s) item_id, movie_title, class")
        i_id, i_title, i_cls = header.index("item_id"), header.index("movie_title"), header.index("class")
        for row_no, row in enumerate(reader, start=2):
            try:
                out.append((int(row[i_id]), row[i_title], frozenset(row[i_cls].split())))
            except (ValueError, IndexError):
                raise AloeError(f"{path}, row {row_no}: cannot parse item_id/movie_title/class") from None
    return out


def movielens_genres() -> dict[int, frozenset[str]]:
    """Raw MovieLens item id -> its genres (the ``class`` column of ``ml-100k.item``)."""
    return {i: g for i, _, g in _movielens_items()}


def item_titles(name: str) -> dict[int, str]:
    """Raw item id -> a readable title where the dataset has one (MovieLens), else an empty dict."""
    return {i: t for i, t, _ in _movielens_items()} if name == "ml100k" else {}
