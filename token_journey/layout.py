"""Where every artifact lives on disk, and how it gets there whole.

This is the only module that knows the folder layout. Every root comes from the `paths` config
(`Layout`); below a root, one (site, layer) always lives at `<root>/<site>/layer_<L>`:

    <corpus>/<split>.parquet                   token sequences of the train and eval splits
    <activations>/<site>/layer_<L>/            train-split shards + manifest.json; eval/ beside them
    <saes>/<site>/layer_<L>/<name>/            one SAE folder; .<name>.ckpt/ is its resumable checkpoint
    <metrics>/<site>/layer_<L>.json            the evaluate stage's metrics (DVC metrics)
    <metrics>/<site>/pareto/layer_<L>.json     its Pareto plot rows (DVC plots)
    <html>/<site>/layer_<L>/<name>.html        the report page of one SAE
    <timings>/<site>/layer_<L>/<name>.train.json    training speed of one SAE (not a DVC output)
    <timings>/<site>/layer_<L>.evaluate.json        evaluation speed of one layer (not a DVC output)

Figures that change from run to run (tokens/s, seconds) live only under <timings>, outside every
DVC output and git, so two runs of the pipeline write byte-identical results.

Writers go through `atomic_write_*` / `replace_folder` (a temporary sibling, then a rename), so a
reader never sees half a file, and hashes through `sha256_file` / `short_hash`. A write that fails
removes its temporary sibling, and one that finds the disk full stops with one line naming the path,
the bytes needed and free (`token_journey.diskspace.writing`, which every local write site uses).

The activations root alone may also be an object-store URI (`s3://bucket/prefix`, read and written
through `pyarrow.fs`, see `token_journey.storage`): `location` turns a configured value into a `Path`
or a `Uri`, and `Uri / part` joins with '/' (pathlib would collapse `s3://` into `s3:/`). Every
function below that takes such a root returns a `Path` for a local root, as before, and a `Uri` for a URI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from token_journey.diskspace import remember_roots, writing
from token_journey.errors import TokenJourneyError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class Uri(str):
    """An object-store location such as `s3://bucket/prefix[?query]`: a str whose `/` adds a path part
    (before any `?query`, e.g. `?endpoint_override=host:port&scheme=http`)."""

    def _split(self) -> tuple[str, str]:
        base, sep, query = self.partition("?")
        return base.rstrip("/"), sep + query

    def __truediv__(self, part: str | os.PathLike) -> Uri:
        base, query = self._split()
        return Uri(f"{base}/{str(part).strip('/')}{query}")

    @property
    def name(self) -> str:
        """The last path part (`shard-00000.parquet`), like `Path.name`."""
        return self._split()[0].rsplit("/", 1)[-1]

    @property
    def scheme(self) -> str:
        return self.split("://", 1)[0].lower()


Location = Path | Uri
"""A local path, or an object-store URI (only the activations root may be one)."""


def is_uri(value: Path | str) -> bool:
    """True for `scheme://...` strings (a local `Path` never is one)."""
    return isinstance(value, Uri) or (isinstance(value, str) and bool(_SCHEME.match(value)))


def location(value: Path | str) -> Location:
    """A configured root as a `Uri` (`s3://...`) or a `Path` (anything else)."""
    if isinstance(value, Uri) or isinstance(value, Path):
        return value
    return Uri(value) if is_uri(value) else Path(value)


LAYER_NAME = re.compile(r"^layer_(\d+)(?:\.json)?$")
"""A layer folder (`layer_5`) or a per-layer file (`layer_5.json`)."""

EVAL_SPLIT = "eval"
"""The held-out split's subfolder of a harvested (site, layer)."""


def layer_name(layer: int) -> str:
    """The folder name of a 0-based decoder layer: `layer_<L>`."""
    return f"layer_{layer}"


def layer_folder(root: Path | str, site: str, layer: int) -> Location:
    """`<root>/<site>/layer_<L>`: one (site, layer) under any root (a `Path`, or a `Uri` under a URI root)."""
    return location(root) / site / layer_name(layer)


def activations_folder(root: Path | str, site: str, layer: int, split: str = "train") -> Location:
    """The shards of one (site, layer, split); the eval split lives in an `eval/` subfolder."""
    folder = layer_folder(root, site, layer)
    return folder / EVAL_SPLIT if split == EVAL_SPLIT else folder


def corpus_file(corpus_root: Path | str, split: str) -> Path:
    """The token sequences of one corpus split (`train` or `eval`): `<corpus>/<split>.parquet`."""
    return Path(corpus_root) / f"{split}.parquet"


def sae_folder(saes_root: Path | str, site: str, layer: int, name: str) -> Path:
    """`<saes>/<site>/layer_<L>/<name>`: one trained SAE."""
    return layer_folder(saes_root, site, layer) / name


def checkpoint_folder(sae_dir: Path) -> Path:
    """The hidden sibling `.<name>.ckpt` that holds an SAE's resumable training checkpoint."""
    return sae_dir.with_name(f".{sae_dir.name}.ckpt")


def lock_file(sae_dir: Path) -> Path:
    """The hidden sibling `.<name>.lock` held while a process trains that SAE (see `token_journey.locks`)."""
    return sae_dir.with_name(f".{sae_dir.name}.lock")


def metrics_file(metrics_root: Path | str, site: str, layer: int) -> Path:
    """`<metrics>/<site>/layer_<L>.json`: the DVC metrics file of one layer."""
    return Path(metrics_root) / site / f"{layer_name(layer)}.json"


def pareto_file(metrics_root: Path | str, site: str, layer: int) -> Path:
    """`<metrics>/<site>/pareto/layer_<L>.json`: the DVC plot rows (one per SAE) of one layer."""
    return Path(metrics_root) / site / "pareto" / f"{layer_name(layer)}.json"


def train_timing_file(timings_root: Path | str, site: str, layer: int, name: str) -> Path:
    """Training speed of one SAE: `<timings>/<site>/layer_<L>/<name>.train.json`."""
    return layer_folder(timings_root, site, layer) / f"{name}.train.json"


def train_read_file(timings_root: Path | str, site: str, layer: int) -> Path:
    """What training one layer's SAEs read and took (bytes, passes over the shards, seconds): `<timings>/<site>/layer_<L>.train.json`."""
    return Path(timings_root) / site / f"{layer_name(layer)}.train.json"


def eval_timing_file(timings_root: Path | str, site: str, layer: int) -> Path:
    """Evaluation speed of one layer: `<timings>/<site>/layer_<L>.evaluate.json`."""
    return Path(timings_root) / site / f"{layer_name(layer)}.evaluate.json"


def report_page(site: str, layer: int, name: str) -> str:
    """Path of one SAE's report page relative to the report root (`<site>/layer_<L>/<name>.html`)."""
    return f"{site}/{layer_name(layer)}/{name}.html"


def layers_under(root: Path | str) -> list[tuple[str, int, Path]]:
    """(site, layer, path) for every `<root>/<site>/layer_<L>` folder or `layer_<L>.json` file, sorted."""
    found = []
    for site_dir in sorted(p for p in Path(root).glob("*") if p.is_dir()):
        for entry in sorted(site_dir.iterdir()):
            match = LAYER_NAME.match(entry.name)
            if match and entry.is_dir() == (not entry.name.endswith(".json")):
                found.append((site_dir.name, int(match.group(1)), entry))
    return found


@dataclass(frozen=True)
class Layout:
    """The roots of every artifact (the `paths` config section) and the paths built from them."""

    base_model: Path
    """The prepared model folder (safetensors + tokenizer + manifest.json)."""
    corpus: Path
    """`train.parquet`, `eval.parquet` and `stats.json` of the tokenized corpus."""
    activations: Location
    """Root of the harvested shards: a local path or an object-store URI (`s3://bucket/prefix`)."""
    saes: Path
    """Root of the trained SAE folders."""
    metrics: Path
    """Root of the evaluate stage's metrics and plot rows."""
    html: Path
    """Root of the HTML report."""
    journey: Path
    """Folder of the journey pages."""
    circuits_data: Path
    """The circuits branch's corpus slice (`corpus/`) and its mlp_in/mlp_out activations (`activations/`)."""
    circuits: Path
    """The circuits branch's transcoders, one folder per layer as under `saes`."""
    graphs: Path
    """Folder of the attribution graphs (viewer JSON, HTML page, metrics)."""
    summary: Path
    """The Markdown summary of the report (its headline table)."""
    timings: Path
    """Root of the run-to-run figures (tokens/s, seconds): neither a DVC output nor in git."""

    def __post_init__(self) -> None:
        remember_roots({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})  # a full disk's error names the setting to change

    @classmethod
    def from_config(cls, paths: Mapping[str, Any]) -> Layout:
        """The layout of a `paths` config section (a mapping or DictConfig); unknown keys are an error."""
        from token_journey.config import build

        roots = {}
        for key, value in dict(paths).items():
            if is_uri(str(value)) and key != "activations":
                raise TokenJourneyError(f"paths.{key}={value} is a URI, but only paths.activations may be on object storage; give paths.{key} a local folder")
            roots[key] = location(str(value)) if key == "activations" else Path(value)
        return build(cls, roots, "paths")

    def corpus_file(self, split: str) -> Path:
        """The token sequences of one corpus split (`train` or `eval`)."""
        return corpus_file(self.corpus, split)

    def journey_to_report(self) -> str:
        """The relative way from a journey page to the report root, for feature links."""
        return Path(os.path.relpath(self.html, self.journey)).as_posix()


# --- writing artifacts whole, and naming their contents -------------------------------------


def temp_sibling(path: Path) -> Path:
    """A hidden temporary name in the same folder (same filesystem, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path | str, data: bytes) -> int:
    """Write `data` to a temporary sibling, then rename it over `path`; returns the byte count.

    A failure leaves `path` as it was and no temporary; a full disk stops with one line (`writing`)."""
    path = Path(path)
    tmp = temp_sibling(path)
    with writing(path, len(data), tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return len(data)


def atomic_write_text(path: Path | str, text: str) -> int:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _strict(value: Any) -> Any:
    """`value` with every NaN float as None, so the file is strict JSON (NaN: e.g. an undefined ratio)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path | str, payload: Any, indent: int = 2) -> int:
    """Write strict JSON (NaN as null) atomically, with a final newline."""
    return atomic_write_text(path, json.dumps(_strict(payload), indent=indent, allow_nan=False) + "\n")


def replace_folder(tmp: Path, folder: Path) -> None:
    """Move a completed temporary folder into place, replacing any old `folder` whole.

    Should the new folder fail to move in, the old one is put back: `folder` is always old or new, whole."""
    if not folder.exists():
        tmp.rename(folder)
        return
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    folder.rename(old)
    try:
        tmp.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    shutil.rmtree(old)


def fresh_temp_folder(folder: Path) -> Path:
    """An empty temporary sibling folder to build `folder` in (see `replace_folder`)."""
    tmp = temp_sibling(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def sha256_file(path: Path | str) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def short_hash(payload: Any) -> str:
    """A 16-hex-digit sha256 of a JSON-able value (keys sorted): an identity key for configs and manifests."""
    text = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dataclass_json(obj: Any) -> Any:
    """A dataclass as the plain JSON value it reads back as (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))
