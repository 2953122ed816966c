"""Prompt sets: the built-in harmful / harmless lists, seeded splits and pairing, and loaders.

* ``builtin("harmful" | "harmless")``: the package's own prompt lists (``cna_jax/data/*.txt``),
  written for this project (>= 300 each).
* ``split``: deterministic train / eval split, disjoint by content and identical in every Python
  process (it orders prompts by a seeded sha256 of their text, never by Python's ``hash()``).
* ``pair``: equal-length aligned harmful / harmless sets for the contrast rows of docs/METHOD.md §3.1.
* ``load_prompts``: a local ``.txt`` / ``.csv`` / ``.json`` / ``.jsonl`` / ``.parquet`` file, a
  known public set name (``jbb``, ``advbench``, ``harmbench``, ``alpaca``) or any hub dataset id.
  Hub loading uses the optional ``datasets`` package, imported only when needed; when it is
  missing or offline the error names the local-file alternative.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

KINDS = ("harmful", "harmless", "other")

# Column names tried, in order, when a local file's prompt column is not given.
PROMPT_COLUMNS = ("goal", "prompt", "instruction", "behavior", "text")

LOCAL_SUFFIXES = (".txt", ".csv", ".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class PromptSet:
    """An ordered, non-empty tuple of prompts with a name and a kind (harmful / harmless / other)."""

    name: str
    prompts: tuple[str, ...]
    kind: str = "other"

    def __post_init__(self):
        # Accept any sequence but store a tuple, so the set is hashable and immutable.
        prompts = tuple(self.prompts)
        object.__setattr__(self, "prompts", prompts)
        if self.kind not in KINDS:
            raise ValueError(f"PromptSet kind must be one of {KINDS}, got {self.kind!r}")
        if not prompts:
            raise ValueError(f"prompt set {self.name!r} is empty: at least one prompt is needed")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt set {self.name!r}: prompt {i} is empty or not a string: {p!r}")

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, i):
        return self.prompts[i]

    @property
    def hash(self) -> str:
        """Short sha256 (12 hex digits) of the prompts' content and order; name and kind excluded."""
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(p.encode("utf-8"))
            h.update(b"\x00")  # separator, so ("ab", "c") and ("a", "bc") differ
        return h.hexdigest()[:12]


# --- built-in sets --------------------------------------------------------------------------


def _read_text_lines(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def builtin(kind: str) -> PromptSet:
    """The package's built-in prompt set: ``"harmful"`` or ``"harmless"``."""
    if kind not in ("harmful", "harmless"):
        raise ValueError(f"builtin prompt sets are 'harmful' and 'harmless', got {kind!r}")
    text = resources.files("cna_jax").joinpath("data").joinpath(f"{kind}.txt").read_text(encoding="utf-8")
    return PromptSet(name=f"builtin-{kind}", prompts=tuple(_read_text_lines(text)), kind=kind)


# --- splitting and pairing ------------------------------------------------------------------


def _seeded_order(prompts: Iterable[str], seed: int) -> list[str]:
    """Prompts sorted by sha256(seed, text): a seeded shuffle that is the same in every process."""
    def key(p: str) -> tuple[str, str]:
        return (hashlib.sha256(f"{int(seed)}\x00{p}".encode("utf-8")).hexdigest(), p)

    return sorted(prompts, key=key)


def _dedupe(prompts: Iterable[str]) -> list[str]:
    """Drop repeated prompts, keeping the first occurrence and the order."""
    return list(dict.fromkeys(prompts))


def split(prompt_set: PromptSet, eval_fraction: float = 0.3, seed: int = 0) -> tuple[PromptSet, PromptSet]:
    """Deterministic train / eval split of ``prompt_set``.

    Repeated prompts are kept once, so the two parts are disjoint by content and together cover
    every distinct prompt. The eval part holds ``round(eval_fraction * n)`` prompts (at least one,
    and at least one left for train), chosen by the seeded sha256 order; each part keeps the
    prompts in their original order. Stable across runs, processes and platforms.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    unique = _dedupe(prompt_set.prompts)
    if len(unique) < 2:
        raise ValueError(f"cannot split prompt set {prompt_set.name!r}: it has {len(unique)} distinct prompt(s)")
    n_eval = min(max(1, round(eval_fraction * len(unique))), len(unique) - 1)
    eval_members = set(_seeded_order(unique, seed)[:n_eval])
    train = tuple(p for p in unique if p not in eval_members)
    evals = tuple(p for p in unique if p in eval_members)
    return (
        PromptSet(name=f"{prompt_set.name}:train", prompts=train, kind=prompt_set.kind),
        PromptSet(name=f"{prompt_set.name}:eval", prompts=evals, kind=prompt_set.kind),
    )


def pair(
    harmful: PromptSet, harmless: PromptSet, seed: int = 0, n: Optional[int] = None
) -> tuple[PromptSet, PromptSet]:
    """Two equal-length aligned sets: row i pairs the i-th harmful with the i-th harmless prompt.

    Each set is shuffled by the seeded sha256 order (independently of the other), then both are
    truncated to the shorter length, or to ``n`` when given (``n`` larger than that is an error).
    """
    a = _seeded_order(harmful.prompts, seed)
    b = _seeded_order(harmless.prompts, seed)
    m = min(len(a), len(b))
    if n is not None:
        if not 1 <= n <= m:
            raise ValueError(f"pair: n={n} but only {m} pairs are available (sets of {len(a)} and {len(b)})")
        m = n
    return (
        PromptSet(name=f"{harmful.name}:paired", prompts=tuple(a[:m]), kind=harmful.kind),
        PromptSet(name=f"{harmless.name}:paired", prompts=tuple(b[:m]), kind=harmless.kind),
    )


# --- known public sets ----------------------------------------------------------------------


@dataclass(frozen=True)
class HubSpec:
    """Where a public prompt set lives on the hub and which column holds the prompts."""

    name: str
    hub_id: str
    config: Optional[str]
    split: str
    column: str
    kind: str
    filename: str  # suggested local file name, used in error messages
    empty_input_only: bool = False  # Alpaca: keep rows whose `input` field is empty


KNOWN_SETS: dict[str, HubSpec] = {
    "jbb": HubSpec("jbb-behaviors", "JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "Goal", "harmful",
                   "behaviors.csv"),
    "advbench": HubSpec("advbench", "walledai/AdvBench", None, "train", "prompt", "harmful", "advbench.csv"),
    "harmbench": HubSpec("harmbench", "walledai/HarmBench", "standard", "train", "prompt", "harmful",
                         "harmbench.csv"),
    "alpaca": HubSpec("alpaca", "tatsu-lab/alpaca", None, "train", "instruction", "harmless", "alpaca.json",
                      empty_input_only=True),
}

# Names accepted for the known sets (lower-cased), the hub ids included.
_ALIASES = {
    "jbb": "jbb", "jbb-behaviors": "jbb", "jailbreakbench": "jbb",
    "advbench": "advbench", "harmbench": "harmbench", "alpaca": "alpaca",
    **{spec.hub_id.lower(): key for key, spec in KNOWN_SETS.items()},
}


def known_set(name: str) -> Optional[HubSpec]:
    """The ``HubSpec`` for a known public set name or hub id (case-insensitive), else None."""
    key = _ALIASES.get(name.strip().lower())
    return KNOWN_SETS[key] if key else None


# --- loading --------------------------------------------------------------------------------


def _pick_column(columns: Sequence[str], column: Optional[str], where: str) -> str:
    """The requested column (exact, then case-insensitive), or the first of PROMPT_COLUMNS present."""
    by_lower = {c.lower(): c for c in columns}
    if column is not None:
        if column in columns:
            return column
        if column.lower() in by_lower:
            return by_lower[column.lower()]
        raise ValueError(f"{where}: no column {column!r}; available columns: {list(columns)}")
    for candidate in PROMPT_COLUMNS:
        if candidate in by_lower:
            return by_lower[candidate]
    raise ValueError(
        f"{where}: could not find a prompt column (tried {list(PROMPT_COLUMNS)}); available columns: "
        f"{list(columns)}; pass column=..."
    )


def _records_to_prompts(records: list[dict], column: Optional[str], where: str) -> list[str]:
    """Prompts from row dicts: the chosen column; Alpaca-style rows with a non-empty `input` dropped."""
    if not records:
        return []
    columns = list(dict.fromkeys(k for r in records for k in r))
    col = _pick_column(columns, column, where)
    input_col = {c.lower(): c for c in columns}.get("input")
    # Alpaca convention: an `instruction` with a non-empty `input` is incomplete on its own.
    drop_with_input = col.lower() == "instruction" and input_col is not None
    out = []
    for r in records:
        if drop_with_input and str(r.get(input_col) or "").strip():
            continue
        value = r.get(col)
        if value is None or (isinstance(value, float) and value != value):  # missing / NaN cell
            continue
        out.append(str(value))
    return out


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: tolerate a BOM
        return list(csv.DictReader(f))


def _json_rows(data: Any, where: str) -> tuple[list[dict] | None, list[str] | None]:
    """(records, None) for row dicts / a columnar dict; (None, prompts) for a list of strings."""
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if lists and len(lists) == len(data):  # columnar: {"goal": [...], "category": [...]}
            n = len(next(iter(lists.values())))
            if any(len(v) != n for v in lists.values()):
                raise ValueError(f"{where}: columnar JSON with columns of different lengths")
            return [{k: v[i] for k, v in lists.items()} for i in range(n)], None
        if len(lists) == 1:  # one list under a key, e.g. {"data": [...], "version": 2}
            return _json_rows(next(iter(lists.values())), where)
        raise ValueError(f"{where}: expected a list of rows, a list of strings or a dict of columns")
    if isinstance(data, list):
        if all(isinstance(x, str) for x in data):
            return None, list(data)
        if all(isinstance(x, dict) for x in data):
            return list(data), None
    raise ValueError(f"{where}: expected a list of rows, a list of strings or a dict of columns")


def _read_parquet(path: Path) -> list[dict]:
    """Rows of a parquet file through whichever engine is installed: pyarrow, pandas or polars."""
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 (optional dependency)

        return pq.read_table(str(path)).to_pylist()
    except ImportError:
        pass
    try:
        import pandas as pd  # noqa: PLC0415 (optional; needs pyarrow or fastparquet itself)

        return pd.read_parquet(path).to_dict(orient="records")
    except ImportError:
        pass
    try:
        import polars as pl  # noqa: PLC0415 (optional)

        return pl.read_parquet(path).to_dicts()
    except ImportError:
        pass
    raise ImportError(
        f"reading {path} needs a parquet engine (pyarrow, pandas with pyarrow/fastparquet, or polars), "
        "none is installed: pip install pyarrow (or 'cna_jax[data]'), or convert the file to CSV / JSONL"
    )


def _read_local(path: Path, column: Optional[str]) -> list[str]:
    """Raw prompts of a local file, by suffix."""
    suffix = path.suffix.lower()
    where = str(path)
    if suffix == ".txt":
        return _read_text_lines(path.read_text(encoding="utf-8"))
    if suffix == ".csv":
        return _records_to_prompts(_read_csv(path), column, where)
    if suffix == ".json":
        records, strings = _json_rows(json.loads(path.read_text(encoding="utf-8")), where)
        return strings if strings is not None else _records_to_prompts(records, column, where)
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        records, strings = _json_rows(rows, where)
        return strings if strings is not None else _records_to_prompts(records, column, where)
    if suffix == ".parquet":
        return _records_to_prompts(_read_parquet(path), column, where)
    raise ValueError(f"{where}: unsupported file type {suffix!r}; use one of {LOCAL_SUFFIXES}")


def _local_file_hint(kind: str, filename: str) -> str:
    key = kind if kind in ("harmful", "harmless") else "harmful"
    return f"download it elsewhere and pass a local file: --config.data.{key}=/path/{filename}"


def _read_hub(hub_id: str, config: Optional[str], split_name: str, column: Optional[str],
              kind: str, filename: str) -> list[str]:
    """Prompts of a hub dataset through ``datasets.load_dataset`` (imported here: optional)."""
    hint = _local_file_hint(kind, filename)
    try:
        import datasets  # noqa: PLC0415 (optional dependency, only for hub loading)
    except ImportError as e:
        raise RuntimeError(
            f"could not load {hub_id!r} from the hub: the optional package 'datasets' is not installed "
            f"(pip install 'cna_jax[data]'); or {hint}"
        ) from e
    try:
        ds = datasets.load_dataset(hub_id, config, split=split_name) if config else \
            datasets.load_dataset(hub_id, split=split_name)
    except Exception as e:  # offline, not cached, unknown id, gated, ...: all end the same way
        raise RuntimeError(
            f"could not load {hub_id!r} (config={config!r}, split={split_name!r}) from the hub (offline?): "
            f"{type(e).__name__}: {e}; {hint}"
        ) from e
    return _records_to_prompts([dict(r) for r in ds], column, f"hub dataset {hub_id!r}")


def _looks_like_path(source: str) -> bool:
    return (
        source.lower().endswith(LOCAL_SUFFIXES)
        or source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
    )


def load_prompts(
    source: str | Path,
    kind: Optional[str] = None,
    column: Optional[str] = None,
    split: Optional[str] = None,
    limit: Optional[int] = None,
) -> PromptSet:
    """Load a prompt set from a local file, a built-in set, a known public set or a hub id.

    ``source``:
      * a local file: ``.txt`` (one prompt per line, '#' lines skipped), ``.csv``, ``.json`` (rows,
        strings or a dict of columns), ``.jsonl`` or ``.parquet`` (needs pyarrow, pandas or polars);
      * ``"builtin:harmful"`` / ``"builtin:harmless"``;
      * a known public set, by name or hub id: ``jbb`` (JailbreakBench/JBB-Behaviors, config
        ``behaviors``, split ``harmful``, column ``Goal``), ``advbench`` (walledai/AdvBench,
        ``prompt``), ``harmbench`` (walledai/HarmBench, config ``standard``, ``prompt``),
        ``alpaca`` (tatsu-lab/alpaca, ``instruction``, rows with an empty ``input`` only);
      * any other hub dataset id (``owner/name``), loaded with ``datasets.load_dataset``.
    ``kind``: harmful / harmless / other; None = the known set's kind, else "other".
    ``column``: the prompt column; None = the known set's column, else the first of
    ``PROMPT_COLUMNS`` present (case-insensitive). An ``instruction`` column with an ``input``
    column beside it keeps only rows with an empty input (the Alpaca convention).
    ``split``: the hub split; None = the known set's split, else "train". Ignored for files.
    ``limit``: keep at most this many prompts (the first ones, after cleaning).

    Prompts are stripped, empty ones dropped and repeats kept once. Raises FileNotFoundError for a
    missing file, ValueError for an empty result or a missing column, RuntimeError (naming the
    local-file option) when the hub cannot be reached or ``datasets`` is not installed.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    text = str(source)
    path = Path(text).expanduser()
    spec = None

    if path.is_file():
        name = path.stem
        raw = _read_local(path, column)
    elif text.startswith("builtin:"):
        base = builtin(text.split(":", 1)[1])
        name, raw = base.name, list(base.prompts)
        kind = kind or base.kind
    elif isinstance(source, Path) or _looks_like_path(text):
        raise FileNotFoundError(f"prompt file not found: {path}")
    else:
        spec = known_set(text)
        if spec is not None:
            name = spec.name
            raw = _read_hub(spec.hub_id, spec.config, split or spec.split, column or spec.column,
                            kind or spec.kind, spec.filename)
        else:
            name = text
            raw = _read_hub(text, None, split or "train", column, kind or "other",
                            f"{text.rsplit('/', 1)[-1]}.csv")

    prompts = _dedupe(p.strip() for p in raw if p is not None and str(p).strip())
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"no prompts found in {text!r} (column={column!r}): the prompt set would be empty")
    kind = kind or (spec.kind if spec else "other")
    return PromptSet(name=name, prompts=tuple(prompts), kind=kind)
