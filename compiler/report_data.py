"""What the build report shows, read from the build folder: the plan, sampled packed rows, runs.

Everything comes from the build itself (the compiler never imports torch, nor the runtime):
``plan.json`` through the one plan reader, packed rows through the numpy shard reader, and
the files ``tunec run`` / ``tunec eval`` leave under ``runs/<stage>/`` read as JSON.

The prompt lint (the plan's top-level ``"lint"`` list) and the cost estimates (an ``"estimate"``
object per stage) are taken from the plan's JSON as it is, and shown generically (a table of
whatever fields they hold); where a plan has none, the report says "not computed".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TunecError
from .inspection import tokenizer_folder
from .pack import IGNORE
from .plan import PLAN_FILE, Plan, StagePlan, read_plan
from .shards import check_values, open_shard

RUNS = "runs"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
RESULT = "result.json"


@dataclass(frozen=True)
class Token:
    text: str
    ids: tuple[int, ...]  # usually one; a character split over several byte tokens is shown once
    trained: bool


@dataclass(frozen=True)
class Document:
    tokens: list[Token] | None  # None: padding
    length: int


@dataclass(frozen=True)
class Row:
    shard: str
    index: int  # row inside the shard
    number: int  # row of the stage (over all its shards)
    documents: list[Document]


@dataclass
class Run:
    """What ``runs/<stage>/`` holds (each part absent when the file is)."""

    train: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    eval: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # task -> (step, loss)
    result: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    skipped_lines: int = 0  # an unfinished last line of metrics.jsonl (a run writing it now)

    @property
    def empty(self) -> bool:
        return not (self.train or self.eval or self.result or self.accuracy)


@dataclass
class Build:
    out: Path
    plan: Plan
    raw: dict[str, Any]
    lint: list[Any] | None
    estimates: dict[str, Any]  # stage -> its "estimate" object (stages without one are absent)
    runs: dict[str, Run]
    samples: dict[str, list[Row]]


def load(out: Path, rows: int, seed: int | None) -> Build:
    out = Path(out)
    plan = read_plan(out)
    raw = _raw(out)  # "not computed" (a key absent) and "no findings" (an empty list) read the same when typed
    stages_raw = {s.get("name"): s for s in raw.get("stages", []) if isinstance(s, dict)}
    estimates = {str(n): s["estimate"] for n, s in stages_raw.items() if s.get("estimate") is not None}
    lint = raw.get("lint")
    samples: dict[str, list[Row]] = {}
    if rows > 0:
        backend = decoder(tokenizer_folder(plan, out))
        for sp in plan.stages:
            samples[sp.name] = sample_rows(plan, out, sp, rows, plan.seed if seed is None else seed, backend)
    runs = {sp.name: read_run(out / RUNS / sp.name) for sp in plan.stages}
    return Build(out, plan, raw, lint, estimates, runs, samples)


def decoder(folder: Path):
    """The build's tokenizer as a ``tokenizers.Tokenizer`` (all the report needs is decoding).

    ``tokenizer.json`` read directly: importing transformers would take most of the report's time.
    A folder without one goes through the compiler's tokenizer loader.
    """
    path = folder / "tokenizer.json"
    if path.is_file():
        import tokenizers

        try:
            return tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, the user gets one line
            raise TunecError(f"{path}: cannot load the tokenizer ({type(exc).__name__})") from None
    from .tokens import load_local_tokenizer

    return load_local_tokenizer(folder).backend_tokenizer


def _raw(out: Path) -> dict[str, Any]:
    """``plan.json`` as JSON (the plan reader has just read it whole)."""
    data = json.loads((out / PLAN_FILE).read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def sample_rows(plan: Plan, out: Path, sp: StagePlan, count: int, seed: int, backend) -> list[Row]:
    """``count`` packed rows of the stage's training data, drawn without replacement by ``seed``
    (the same rows every time), in order, each split into documents and tokens."""
    total = sp.train.rows
    if total == 0:
        return []
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(count, total), replace=False))
    rows: list[Row] = []
    first = 0
    for entry in sp.train.shards:
        mine = picks[(picks >= first) & (picks < first + entry.rows)] - first
        if len(mine):
            arrays = open_shard(out / entry.path, entry.bytes, seq_len=sp.train.seq_len)
            check_values(out / entry.path, arrays, plan.tokenizer.vocab_size)
            for r in mine.tolist():
                docs = split_row(np.asarray(arrays["input_ids"][r]), np.asarray(arrays["labels"][r]),
                                 np.asarray(arrays["position_ids"][r]), plan.tokenizer.pad_id, backend)
                rows.append(Row(entry.path, r, first + r, docs))
        first += entry.rows
    return rows


def split_row(ids: np.ndarray, labels: np.ndarray, pos: np.ndarray, pad_id: int, backend) -> list[Document]:
    """A packed row as documents (positions restart at 0) of tokens with their text and trained flag.

    Each token is decoded alone; a token that decodes to a replacement character (one byte of a
    character that several byte-level tokens spell) is shown together with the next ones, up to
    four, when together they decode to whole characters.
    """
    starts = np.flatnonzero(pos == 0).tolist() + [len(ids)]
    alone = backend.decode_batch([[int(i)] for i in ids.tolist()], skip_special_tokens=False)
    docs = []
    for lo, hi in zip(starts[:-1], starts[1:]):
        if np.all(ids[lo:hi] == pad_id) and np.all(labels[lo:hi] == IGNORE):
            docs.append(Document(None, hi - lo))
            continue
        tokens, i = [], lo
        while i < hi:
            j, text = i + 1, alone[i]
            trained = bool(labels[i] != IGNORE)
            if "\ufffd" in text:
                for k in range(i + 2, min(i + 4, hi) + 1):
                    if bool(labels[k - 1] != IGNORE) != trained:
                        break
                    joined = backend.decode([int(t) for t in ids[i:k]], skip_special_tokens=False)
                    if "\ufffd" not in joined:
                        j, text = k, joined
                        break
            tokens.append(Token(text, tuple(int(t) for t in ids[i:j]), trained))
            i = j
        docs.append(Document(tokens, hi - lo))
    return docs


def read_run(folder: Path) -> Run:
    run = Run()
    metrics = folder / METRICS
    if metrics.is_file():
        text = _read(metrics)
        lines = text.split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if n == len(lines):  # no newline yet: the record being written right now
                    run.skipped_lines += 1
                    continue
                raise TunecError(f"{metrics}:{n}: not a JSON record; the file is damaged") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise TunecError(f"{metrics}:{n}: a record without an integer `step`; the file is damaged")
            if isinstance(record.get("loss"), (int, float)):
                run.train.append((record["step"], float(record["loss"])))
            if isinstance(record.get("eval_loss"), dict):
                for task, loss in record["eval_loss"].items():
                    if isinstance(loss, (int, float)):
                        run.eval.setdefault(task, []).append((record["step"], float(loss)))
    run.result = _read_json(folder / RESULT)
    run.accuracy = _read_json(folder / EVAL)
    return run


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TunecError(f"{path}: not UTF-8 (byte {exc.start}); the file is damaged") from None
    except OSError as exc:
        raise TunecError(f"{path}: cannot read it ({type(exc).__name__})") from None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise TunecError(f"{path}:{exc.lineno}:{exc.colno}: not JSON ({exc.msg}); delete it or run again") from None
    except RecursionError:
        raise TunecError(f"{path}: nested too deeply to be a tunec file; delete it or run again") from None
    if not isinstance(data, dict):
        raise TunecError(f"{path}: not a JSON object; delete it or run again")
    return data
