"""Evaluation text: the Lee news corpus (from the gensim wheel) and the corpora in ``shared/data/text``."""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from aloe import AloeError


def _origin_checkout(repo: Path) -> Path | None:
    """The local checkout ``repo`` was cloned from (its ``origin`` remote, when that is a folder), or None."""
    try:
        lines = (repo / ".git" / "config").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    in_origin = False
    for line in lines:
        text = line.strip()
        if text.startswith("["):
            in_origin = text.replace(" ", "") == '[remote"origin"]'
        elif in_origin and text.startswith("url") and "=" in text:
            url = text.split("=", 1)[1].strip().removeprefix("file://")
            path = Path(url).expanduser()
            return path if path.is_absolute() and path.is_dir() else None
    return None


def data_root() -> Path:
    """``$ALOE_DATA`` if set, else the ``shared/data`` folder beside the repository checkout, or else beside the
    local checkout this one was cloned from (a scratch clone elsewhere still finds the project's data)."""
    env = os.environ.get("ALOE_DATA")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]
    beside = repo.parent / "shared" / "data"
    if not beside.is_dir():
        origin = _origin_checkout(repo)
        if origin is not None and (origin.parent / "shared" / "data").is_dir():
            return origin.parent / "shared" / "data"
    return beside


def _gensim_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise AloeError("package gensim is not installed (the Lee corpus ships in its wheel); install it with "
                        "'pip install --no-deps gensim==4.4.0' (make setup does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise AloeError(f"package gensim is installed but {path} is missing; reinstall it")
    return path


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.strip()]


def _lee() -> list[str]:
    return _lines(_gensim_file("lee_background.cor"))


def _lee_test() -> list[str]:
    return _lines(_gensim_file("lee.cor"))


def _need(path: Path) -> Path:
    if not path.exists():
        raise AloeError(f"corpus file {path} is missing (set ALOE_DATA to the folder holding text/)")
    return path


def _shakespeare() -> list[str]:
    folder = _need(data_root() / "text" / "shakespeare")
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise AloeError(f"no *_gut.txt files in {folder}")
    return [f.read_text(encoding="latin-1") for f in files]


def _kjv() -> list[str]:
    path = _need(data_root() / "text" / "kjv_verses.tsv")
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        if reader.fieldnames is None or "text" not in reader.fieldnames or "book" not in reader.fieldnames:
            raise AloeError(f"{path} is malformed: expected columns book, chapter, verse, text")
        for row in reader:
            books.setdefault(row["book"], []).append(row["text"] or "")
    return [" ".join(v) for v in books.values()]


CORPORA: dict[str, Callable[[], list[str]]] = {
    "lee": _lee,
    "lee-test": _lee_test,
    "shakespeare": _shakespeare,
    "kjv": _kjv,
}


def load_corpus(name: str) -> list[str]:
    """Documents of a named corpus: ``lee`` (300 news articles), ``lee-test`` (50), ``shakespeare`` (one
    document per work) or ``kjv`` (one per book)."""
    try:
        loader = CORPORA[name]
    except KeyError:
        raise AloeError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}") from None
    return loader()
