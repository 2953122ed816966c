"""Prompt sets: built-in lists, splits, pairing, hashing and the loaders (no network)."""
import csv
import itertools
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cna_jax import data
from cna_jax.data import PromptSet, builtin, known_set, load_prompts, pair, split

REPO = Path(__file__).resolve().parents[1]


# --- built-in sets ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harmful():
    return builtin("harmful")


@pytest.fixture(scope="module")
def harmless():
    return builtin("harmless")


def _normalise(p):
    return " ".join(re.findall(r"[a-z0-9]+", p.lower()))


def test_builtin_counts_and_kinds(harmful, harmless):
    assert len(harmful) >= 300 and len(harmless) >= 300
    assert harmful.kind == "harmful" and harmless.kind == "harmless"
    for ps in (harmful, harmless):
        assert all(p == p.strip() and p and not p.startswith("#") for p in ps.prompts)


def test_builtin_all_distinct(harmful, harmless):
    for ps in (harmful, harmless):
        assert len(set(ps.prompts)) == len(ps)
        # distinct after lower-casing and dropping punctuation too
        assert len({_normalise(p) for p in ps.prompts}) == len(ps)
    assert not set(map(_normalise, harmful.prompts)) & set(map(_normalise, harmless.prompts))


def test_builtin_no_near_duplicates(harmful, harmless):
    """No two prompts of a set share most of their content words (token Jaccard >= 0.7)."""
    stop = set("a an the to how of for and in on with my me i that without someone's someone "
               "explain describe write give tell create what is".split())
    for ps in (harmful, harmless):
        words = [set(_normalise(p).split()) - stop for p in ps.prompts]
        close = [
            (ps.prompts[i], ps.prompts[j])
            for i, j in itertools.combinations(range(len(words)), 2)
            if words[i] and words[j] and len(words[i] & words[j]) / len(words[i] | words[j]) >= 0.7
        ]
        assert close == []


def test_builtin_unknown_kind():
    with pytest.raises(ValueError, match="harmful"):
        builtin("other")


# --- PromptSet ----------------------------------------------------------------------------------


def test_promptset_basics():
    ps = PromptSet("t", ["a", "b", "c"], "other")
    assert ps.prompts == ("a", "b", "c") and isinstance(ps.prompts, tuple)
    assert len(ps) == 3 and list(ps) == ["a", "b", "c"] and ps[1] == "b"
    with pytest.raises(Exception):
        ps.name = "u"  # frozen


def test_promptset_hash_stable_and_content_only():
    ps = PromptSet("t", ("alpha", "beta"), "harmful")
    # Fixed value: sha256(b"alpha\x00beta\x00")[:12]; guards against accidental changes of the recipe.
    assert ps.hash == "63ed4f61f097"
    assert PromptSet("other name", ("alpha", "beta"), "harmless").hash == ps.hash
    assert PromptSet("t", ("beta", "alpha")).hash != ps.hash  # order matters
    assert PromptSet("t", ("alphab", "eta")).hash != ps.hash  # separator matters
    assert len(ps.hash) == 12 and int(ps.hash, 16) >= 0


def test_promptset_rejects_empty_and_bad_kind():
    with pytest.raises(ValueError, match="empty"):
        PromptSet("t", ())
    with pytest.raises(ValueError, match="empty"):
        PromptSet("t", ("ok", "  "))
    with pytest.raises(ValueError, match="kind"):
        PromptSet("t", ("ok",), "nasty")


# --- split --------------------------------------------------------------------------------------


def test_split_deterministic_disjoint_covering(harmful):
    train, evals = split(harmful, eval_fraction=0.3, seed=0)
    train2, evals2 = split(harmful, eval_fraction=0.3, seed=0)
    assert train == train2 and evals == evals2
    assert not set(train.prompts) & set(evals.prompts)
    assert set(train.prompts) | set(evals.prompts) == set(harmful.prompts)
    assert len(evals) == round(0.3 * len(harmful))
    assert train.kind == evals.kind == "harmful"
    assert train.name.endswith(":train") and evals.name.endswith(":eval")
    # Each part keeps the original order.
    pos = {p: i for i, p in enumerate(harmful.prompts)}
    for part in (train, evals):
        idx = [pos[p] for p in part.prompts]
        assert idx == sorted(idx)


def test_split_seed_changes_membership(harmless):
    _, e0 = split(harmless, seed=0)
    _, e1 = split(harmless, seed=1)
    assert set(e0.prompts) != set(e1.prompts)


def test_split_independent_of_input_order(harmless):
    shuffled = PromptSet(harmless.name, tuple(reversed(harmless.prompts)), harmless.kind)
    assert set(split(harmless)[1].prompts) == set(split(shuffled)[1].prompts)


def test_split_duplicates_and_small_sets():
    ps = PromptSet("d", ("a", "b", "a", "c", "b"))
    train, evals = split(ps, eval_fraction=0.5)
    assert not set(train.prompts) & set(evals.prompts)
    assert sorted(train.prompts + evals.prompts) == ["a", "b", "c"]
    two = split(PromptSet("two", ("x", "y")), eval_fraction=0.01)
    assert len(two[0]) == 1 and len(two[1]) == 1
    with pytest.raises(ValueError, match="distinct"):
        split(PromptSet("one", ("x", "x")))
    with pytest.raises(ValueError, match="eval_fraction"):
        split(ps, eval_fraction=1.0)


_SUBPROCESS_SCRIPT = """
from cna_jax.data import builtin, split, pair
h, b = builtin("harmful"), builtin("harmless")
tr, ev = split(h, eval_fraction=0.3, seed=7)
ph, pb = pair(h, b, seed=3, n=50)
print(tr.hash, ev.hash, ph.hash, pb.hash)
"""


@pytest.mark.parametrize("hashseed", ["1", "12345"])
def test_split_and_pair_stable_across_processes(harmful, harmless, hashseed):
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": hashseed, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    ).stdout.split()
    tr, ev = split(harmful, eval_fraction=0.3, seed=7)
    ph, pb = pair(harmful, harmless, seed=3, n=50)
    assert out == [tr.hash, ev.hash, ph.hash, pb.hash]


# --- pair ---------------------------------------------------------------------------------------


def test_pair_aligned_and_truncated(harmful, harmless):
    small = PromptSet("small", harmless.prompts[:40], "harmless")
    ph, pb = pair(harmful, small, seed=0)
    assert len(ph) == len(pb) == 40
    assert set(pb.prompts) == set(small.prompts)
    assert set(ph.prompts) <= set(harmful.prompts)
    assert ph.kind == "harmful" and pb.kind == "harmless"
    # Deterministic, and seed-dependent.
    assert pair(harmful, small, seed=0) == (ph, pb)
    assert pair(harmful, small, seed=1)[0] != ph


def test_pair_n_and_alignment(harmful, harmless):
    ph, pb = pair(harmful, harmless, seed=0, n=25)
    assert len(ph) == len(pb) == 25
    # Rows are aligned: the first 25 of the full pairing, pair by pair.
    fh, fb = pair(harmful, harmless, seed=0)
    assert list(zip(ph.prompts, pb.prompts)) == list(zip(fh.prompts, fb.prompts))[:25]
    with pytest.raises(ValueError, match="pairs are available"):
        pair(harmful, harmless, n=10_000)


# --- local files --------------------------------------------------------------------------------


def test_load_txt(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# header\n first prompt \n\nsecond prompt\nfirst prompt\n", encoding="utf-8")
    ps = load_prompts(f, kind="harmful")
    assert ps.prompts == ("first prompt", "second prompt")  # stripped, '#' and blanks skipped, deduped
    assert ps.name == "mine" and ps.kind == "harmful"
    assert load_prompts(str(f)).kind == "other"


def test_load_csv_autodetects_column(tmp_path):
    f = tmp_path / "behaviors.csv"
    with f.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["Index", "Goal", "Target", "Category"])
        w.writerow(["0", "Request number one", "Sure", "A"])
        w.writerow(["1", "Request, with a comma", "Sure", "B"])
    ps = load_prompts(f, kind="harmful")
    assert ps.prompts == ("Request number one", "Request, with a comma")
    assert load_prompts(f, column="Category").prompts == ("A", "B")
    with pytest.raises(ValueError, match="no column 'missing'"):
        load_prompts(f, column="missing")


def test_load_csv_column_priority_and_bom(tmp_path):
    f = tmp_path / "p.csv"
    # goal comes before prompt in the detection order, whatever the file's column order.
    f.write_text("\ufeffprompt,goal\nfrom prompt,from goal\n", encoding="utf-8")
    assert load_prompts(f).prompts == ("from goal",)
    g = tmp_path / "q.csv"
    g.write_text("id,category\n1,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="could not find a prompt column"):
        load_prompts(g)


def test_load_json_forms(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"prompt": "p1", "x": 1}, {"prompt": "p2", "x": 2}]), encoding="utf-8")
    assert load_prompts(rows).prompts == ("p1", "p2")
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["s1", "s2", ""]), encoding="utf-8")
    assert load_prompts(strings).prompts == ("s1", "s2")
    columnar = tmp_path / "columnar.json"
    columnar.write_text(json.dumps({"behavior": ["b1", "b2"], "id": [0, 1]}), encoding="utf-8")
    assert load_prompts(columnar).prompts == ("b1", "b2")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": [{"text": "t1"}]}), encoding="utf-8")
    assert load_prompts(wrapped).prompts == ("t1",)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(42), encoding="utf-8")
    with pytest.raises(ValueError, match="expected a list"):
        load_prompts(bad)


def test_load_jsonl_and_alpaca_filter(tmp_path):
    f = tmp_path / "alpaca.jsonl"
    lines = [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "..."},
        {"instruction": "Translate the sentence.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "Name a primary colour.", "input": "", "output": "Red"},
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    ps = load_prompts(f, kind="harmless")
    # The row with a non-empty `input` is dropped (Alpaca convention).
    assert ps.prompts == ("Give three tips for staying healthy.", "Name a primary colour.")
    plain = tmp_path / "plain.jsonl"
    plain.write_text('"one"\n"two"\n', encoding="utf-8")
    assert load_prompts(plain).prompts == ("one", "two")


def test_load_limit_and_builtin_source(tmp_path):
    f = tmp_path / "many.txt"
    f.write_text("\n".join(f"prompt {i}" for i in range(10)), encoding="utf-8")
    assert load_prompts(f, limit=3).prompts == ("prompt 0", "prompt 1", "prompt 2")
    with pytest.raises(ValueError, match="limit"):
        load_prompts(f, limit=0)
    ps = load_prompts("builtin:harmless")
    assert ps == builtin("harmless")
    assert load_prompts("builtin:harmful", limit=5).prompts == builtin("harmful").prompts[:5]


def test_load_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_prompts(missing)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_prompts(str(missing))
    with pytest.raises(FileNotFoundError, match="relative/file.txt"):
        load_prompts("relative/file.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(empty)
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("goal\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(empty_csv)
    other = tmp_path / "prompts.xlsx"
    other.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_prompts(other)


def _hide_modules(monkeypatch, *names):
    """Make `import name` raise ImportError for each name (None in sys.modules does that)."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_parquet_without_engine_names_alternatives(tmp_path, monkeypatch):
    f = tmp_path / "x.parquet"
    f.write_bytes(b"PAR1 not really parquet PAR1")
    _hide_modules(monkeypatch, "pyarrow", "pyarrow.parquet", "pandas", "polars")
    with pytest.raises(ImportError, match="pip install pyarrow.*CSV / JSONL"):
        load_prompts(f)


def test_parquet_through_installed_engine(tmp_path, monkeypatch):
    """The parquet path hands the file to the engine and reads its rows (engine faked: pyarrow is
    an optional dependency that may be absent here)."""
    f = tmp_path / "hb.parquet"
    f.write_bytes(b"PAR1")
    seen = []

    class Table:
        def to_pylist(self):
            return [{"prompt": "row one", "category": "c"}, {"prompt": "row two", "category": "c"}]

    def read_table(path):
        seen.append(path)
        return Table()

    pq = types.ModuleType("pyarrow.parquet")
    pq.read_table = read_table
    pa = types.ModuleType("pyarrow")
    pa.parquet = pq
    monkeypatch.setitem(sys.modules, "pyarrow", pa)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)
    ps = load_prompts(f, kind="harmful")
    assert ps.prompts == ("row one", "row two") and seen == [str(f)]
    # Missing cells (None, or NaN as pandas gives them) are skipped, not turned into "nan".
    Table.to_pylist = lambda self: [{"prompt": None}, {"prompt": float("nan")}, {"prompt": "kept"}]
    assert load_prompts(f).prompts == ("kept",)


# --- hub ----------------------------------------------------------------------------------------


def test_known_set_names():
    assert known_set("JBB").hub_id == "JailbreakBench/JBB-Behaviors"
    assert known_set("jailbreakbench/jbb-behaviors").name == "jbb-behaviors"
    assert known_set("advbench").column == "prompt"
    assert known_set("HarmBench").config == "standard"
    assert known_set("alpaca").empty_input_only and known_set("alpaca").kind == "harmless"
    assert known_set("someone/else") is None


def test_hub_without_datasets_package(monkeypatch):
    _hide_modules(monkeypatch, "datasets")
    with pytest.raises(RuntimeError) as err:
        load_prompts("jbb")
    msg = str(err.value)
    assert "JailbreakBench/JBB-Behaviors" in msg and "not installed" in msg
    assert "--config.data.harmful=/path/behaviors.csv" in msg


def _fake_datasets(monkeypatch, load_dataset):
    mod = types.ModuleType("datasets")
    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_hub_offline_error_names_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub (offline mode is enabled)")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(RuntimeError) as err:
        load_prompts("tatsu-lab/alpaca")
    msg = str(err.value)
    assert "could not load 'tatsu-lab/alpaca'" in msg and "offline?" in msg
    assert "--config.data.harmless=/path/alpaca.json" in msg
    with pytest.raises(RuntimeError, match="some-org/unknown-set"):
        load_prompts("some-org/unknown-set")


@pytest.mark.parametrize(
    "source,hub_id,config,split_name,rows,expected,kind",
    [
        ("jbb", "JailbreakBench/JBB-Behaviors", "behaviors", "harmful",
         [{"Goal": "g1", "Behavior": "b1"}, {"Goal": "g2", "Behavior": "b2"}], ("g1", "g2"), "harmful"),
        ("AdvBench", "walledai/AdvBench", None, "train",
         [{"prompt": "a1", "target": "t"}], ("a1",), "harmful"),
        ("walledai/HarmBench", "walledai/HarmBench", "standard", "train",
         [{"prompt": "h1", "category": "c"}, {"prompt": "h1", "category": "c"}], ("h1",), "harmful"),
        ("alpaca", "tatsu-lab/alpaca", None, "train",
         [{"instruction": "i1", "input": "", "output": "o"}, {"instruction": "i2", "input": "x", "output": "o"}],
         ("i1",), "harmless"),
    ],
)
def test_hub_known_sets_use_their_spec(monkeypatch, source, hub_id, config, split_name, rows, expected, kind):
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return iter(rows)  # a datasets.Dataset iterates as row dicts

    _fake_datasets(monkeypatch, load_dataset)
    ps = load_prompts(source)
    assert calls == [(hub_id, config, split_name)]
    assert ps.prompts == expected and ps.kind == kind


def test_hub_generic_id_split_column_and_kind(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"id": 1, "question": "q1", "text": "t1"}]

    _fake_datasets(monkeypatch, load_dataset)
    assert load_prompts("org/set").prompts == ("t1",)  # auto-detected `text`
    assert load_prompts("org/set", column="question", split="test", kind="harmful").kind == "harmful"
    assert calls == [("org/set", None, "train"), ("org/set", None, "test")]
    # An explicit split overrides a known set's default.
    load_prompts("jbb", split="benign", column="question")
    assert calls[-1] == ("JailbreakBench/JBB-Behaviors", "behaviors", "benign")


def test_hub_empty_result_is_value_error(monkeypatch):
    _fake_datasets(monkeypatch, lambda *a, **k: [])
    with pytest.raises(ValueError, match="empty"):
        load_prompts("advbench")
    with pytest.raises(ValueError, match="kind"):
        load_prompts("advbench", kind="evil")


def test_module_has_no_eager_optional_imports():
    src = (REPO / "cna_jax" / "data.py").read_text()
    top = [line for line in src.splitlines() if line.startswith(("import ", "from "))]
    assert not any(m in " ".join(top) for m in ("datasets", "pandas", "pyarrow", "polars"))
    assert data.PROMPT_COLUMNS[:3] == ("goal", "prompt", "instruction")
