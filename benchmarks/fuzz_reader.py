"""Fuzz the trace reader, the analyzer and the CLI with mutated copies of the golden trace.

    python benchmarks/fuzz_reader.py [--minutes 3] [--seed 0] [--out DIR]
    python benchmarks/fuzz_reader.py --replay CASE [--seed 0] [--out DIR]

Each case is derived from (seed, case number) alone: one file of the golden trace
(the main stream, a part stream or an end record) gets one to three mutations
(bit flips, truncations, splices from other files, inserted, deleted or duplicated
bytes, schema-metadata edits, columns retyped, dropped, nulled or filled with
extreme values, end-record fields replaced), then ``read_trace``, ``analyze`` and
the ``kvprof info`` / ``kvprof analyze`` entry points run on it. The contract:
only ``KvprofError`` subclasses may escape the library, and the CLI exits 0 or
with a typed error code and exactly one ``kvprof: error:`` line on stderr. Any
other outcome is a failure: its case folder is saved under ``--out`` and a
command that replays it is printed. Prints cases/s and totals.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden-1.0" / "trace.arrow"
GOLDEN_PARTS = Path(str(GOLDEN) + ".parts")
MAIN = "trace.arrow"


def golden_files() -> dict[str, bytes]:
    """Every file of the golden trace, by path relative to the case folder."""
    files = {MAIN: GOLDEN.read_bytes()}
    for part in sorted(GOLDEN_PARTS.iterdir()):
        files[f"{MAIN}.parts/{part.name}"] = part.read_bytes()
    return files


FILES = golden_files()
STREAMS = [name for name in FILES if name.endswith(".arrow")]
END_RECORDS = [name for name in FILES if name.endswith(".json")]

# ------------------------------------------------------------ byte mutations
# Each takes (data, a, b, payload) with a, b any non-negative integers (reduced here).


def flip(data: bytes, a: int, b: int, payload: bytes) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    out[a % len(out)] ^= 1 << (b % 8)
    return bytes(out)


def truncate(data: bytes, a: int, b: int, payload: bytes) -> bytes:
    return data[:a % (len(data) + 1)]


def delete(data: bytes, a: int, b: int, payload: bytes) -> bytes:
    start = a % (len(data) + 1)
    return data[:start] + data[start + 1 + b % 64:]


def insert(data: bytes, a: int, b: int, payload: bytes) -> bytes:
    at = a % (len(data) + 1)
    return data[:at] + payload + data[at:]


def overwrite(data: bytes, a: int, b: int, payload: bytes) -> bytes:
    at = a % (len(data) + 1)
    return data[:at] + payload + data[at + len(payload):]


def splice(data: bytes, a: int, b: int, payload: bytes) -> bytes:
    """A stretch of another golden file over this one (real Arrow messages, wrong place)."""
    donor = FILES[STREAMS[b % len(STREAMS)]]
    start = (a * 7919) % len(donor)
    return overwrite(data, a, 0, donor[start:start + 8 + b % 512])


def duplicate(data: bytes, a: int, b: int, payload: bytes) -> bytes:
    if not data:
        return data
    start = a % len(data)
    chunk = data[start:start + 1 + b % 256]
    at = (a + b) % (len(data) + 1)
    return data[:at] + chunk + data[at:]


BYTE_MUTATIONS = {f.__name__: f for f in (flip, truncate, delete, insert, overwrite, splice, duplicate)}

# ------------------------------------------------------- structured mutations
INTERESTING_TEXT = [b"", b"1.0", b"1.9", b"2.0", b"0.1", b"one", b"1", b"-1.0", b"\xff\xfe",
                    b"99999999999999999999.0", b"steps", b"requests", b"forward", b"{}", b"[]",
                    b"null", b"42", b'{"kv": 3}', b'{"engine": []}', b'{"kv": {"bytes_per_block": "x"}}',
                    b'{"engine": {"max_num_batched_tokens": -1}}', b"{not json"]
META_KEYS = [b"kvprof.format_version", b"kvprof.table", b"kvprof.run", b"kvprof.writer"]
OTHER_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint32(), pa.float64(),
               pa.string(), pa.bool_()]


def _read_golden(name: str) -> pa.Table:
    return ipc.open_stream(FILES[name]).read_all()


def _stream(table: pa.Table, compression: str | None = "zstd") -> bytes:
    sink = pa.BufferOutputStream()
    options = ipc.IpcWriteOptions(compression=compression)
    with ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=16)
    return sink.getvalue().to_pybytes()


def edit_metadata(name: str, a: int, b: int, payload: bytes) -> bytes:
    table = _read_golden(name)
    meta = dict(table.schema.metadata or {})
    key = META_KEYS[a % len(META_KEYS)]
    if b % 5 == 0:
        meta.pop(key, None)
    else:
        meta[key] = payload if b % 5 == 1 else INTERESTING_TEXT[b % len(INTERESTING_TEXT)]
    return _stream(table.replace_schema_metadata(meta))


def _column_values(n: int, kind: int, typ: pa.DataType, original: pa.ChunkedArray, rnd: random.Random):
    """Values for a column replaced whole: extremes, negatives, shuffles, randoms."""
    width = getattr(typ, "bit_width", 64)
    signed = pa.types.is_signed_integer(typ)
    top = 2 ** (width - 1) - 1 if signed else 2 ** width - 1
    low = -top - 1 if signed else 0
    values = original.to_pylist()
    choices = [
        lambda: [top] * n, lambda: [low] * n, lambda: [-1] * n if signed else [0] * n,
        lambda: [0] * n, lambda: values[::-1], lambda: rnd.sample(values, n),
        lambda: [rnd.randint(low, top) for _ in range(n)],
        lambda: [rnd.randint(-3, 3) if signed else rnd.randint(0, 3) for _ in range(n)],
        lambda: [v + rnd.randint(-2, 2) if v is not None and low + 2 <= v <= top - 2 else v for v in values],
    ]
    return choices[kind % len(choices)]()


def edit_column(name: str, a: int, b: int, payload: bytes) -> bytes:
    """Retype, drop, null or refill one column; or add a column; metadata kept."""
    table = _read_golden(name)
    if table.num_columns == 0:
        return FILES[name]
    i = a % table.num_columns
    field = table.schema.field(i)
    col = table.column(i)
    rnd = random.Random(a * 1000003 + b)
    action = b % 6
    if action == 0:
        typ = OTHER_TYPES[(a + b) % len(OTHER_TYPES)]
        try:
            new = col.cast(typ, safe=False)
        except (pa.ArrowException, ValueError):
            new = pa.nulls(table.num_rows, typ)
        table = table.set_column(i, pa.field(field.name, typ, nullable=True), new)
    elif action == 1:
        table = table.remove_column(i)
    elif action == 2:
        values = col.to_pylist()
        for k in range(len(values)):
            if rnd.random() < 0.3:
                values[k] = None
        table = table.set_column(i, pa.field(field.name, field.type, nullable=True),
                                 pa.array(values, field.type))
    elif action == 3:
        table = table.append_column(pa.field(f"extra{b % 7}", pa.int64()),
                                    pa.array(range(table.num_rows), pa.int64()))
    elif pa.types.is_integer(field.type):
        values = _column_values(table.num_rows, b // 6, field.type, col, rnd)
        table = table.set_column(i, field, pa.array(values, field.type))
    else:
        table = table.slice(0, (a + b) % (table.num_rows + 1))
    return _stream(table, compression=None if b % 2 else "zstd")


JSON_VALUES = [None, -1, 0, 1, 2 ** 40, "x", "", [], {}, [1, 2], {"steps": "x"}, {"steps": -5},
               {"steps": None}, {"steps": 10 ** 30}, {"nope": 1}, True, False, 1.5]
END_FIELDS = ["writer", "complete", "cut_short", "rows_written", "rows_dropped", "steps",
              "requests_seen", "pid"]


def edit_end_record(name: str, a: int, b: int, payload: bytes) -> bytes:
    record = json.loads(FILES[name])
    key = END_FIELDS[a % len(END_FIELDS)]
    if b % 9 == 0:
        record.pop(key, None)
    else:
        record[key] = JSON_VALUES[b % len(JSON_VALUES)]
    if a % 11 == 0:
        record = JSON_VALUES[b % len(JSON_VALUES)]
    return json.dumps(record).encode()


STRUCTURED = {"edit_metadata": edit_metadata, "edit_column": edit_column}

# ---------------------------------------------------------------- one case


def describe_case(seed: int, case: int) -> tuple[str, list[tuple]]:
    """(target file, [(mutation, a, b, payload)]) for a case number, from the seed alone."""
    rnd = random.Random(f"{seed}:{case}")
    target = rnd.choice([MAIN] * 4 + STREAMS + END_RECORDS)
    ops = []
    if target in END_RECORDS:
        ops.append(("edit_end_record", rnd.getrandbits(16), rnd.getrandbits(16), b""))
    elif rnd.random() < 0.45:
        ops.append((rnd.choice(list(STRUCTURED)), rnd.getrandbits(16), rnd.getrandbits(16),
                    rnd.randbytes(rnd.randint(0, 12))))
    for _ in range(rnd.choice([0, 1, 1, 2, 3]) if ops else rnd.choice([1, 1, 2, 3])):
        ops.append((rnd.choice(list(BYTE_MUTATIONS)), rnd.getrandbits(24), rnd.getrandbits(16),
                    rnd.randbytes(rnd.randint(1, 16))))
    return target, ops


def mutate(target: str, ops: list[tuple]) -> bytes:
    data = FILES[target]
    for kind, a, b, payload in ops:
        if kind == "edit_end_record":
            data = edit_end_record(target, a, b, payload)
        elif kind in STRUCTURED:
            data = STRUCTURED[kind](target, a, b, payload)
        else:
            data = BYTE_MUTATIONS[kind](data, a, b, payload)
    return data


def write_case(folder: Path, target: str, data: bytes) -> Path:
    """The golden trace in ``folder`` with ``target`` replaced by ``data``."""
    for name, content in FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if name == target else content)
    return folder / MAIN


class Failure(Exception):
    """The contract was broken (an unexpected exception or a bad CLI outcome)."""


def check(path: Path, cli: bool = True, text_report: bool = False) -> str:
    """Run the reader, the analyzer and the CLI on ``path``; the outcome's name, or Failure."""
    from kvprof.analysis import analyze
    from kvprof.errors import KvprofError
    from kvprof.format.reader import read_trace

    outcome = "analyzed"
    try:
        trace = read_trace(str(path))
        analysis = analyze(trace)
        analysis.to_dict()
    except KvprofError as exc:
        outcome = f"refused:{type(exc).__name__}"
    except Exception as exc:
        raise Failure(f"library raised {type(exc).__name__}: {exc}") from exc
    if cli:
        run_cli(["info", str(path)])
        run_cli(["analyze", "--json", str(path)])
        if text_report:
            run_cli(["analyze", str(path)])
    return outcome


def run_cli(argv: list[str]) -> int:
    from kvprof.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except Exception as exc:
        raise Failure(f"kvprof {argv[0]} raised {type(exc).__name__}: {exc}") from exc
    finally:
        gc.unfreeze()   # the analyze command freezes the heap: fine once per process, not here
    lines = err.getvalue().splitlines()
    if "Traceback" in err.getvalue():
        raise Failure(f"kvprof {argv[0]} printed a traceback")
    if rc not in (0, 1, 2, 3):
        raise Failure(f"kvprof {argv[0]} exited {rc}")
    if rc != 0 and (len(lines) != 1 or not lines[0].startswith("kvprof: error: ")):
        raise Failure(f"kvprof {argv[0]} exited {rc} with stderr {lines!r}")
    return rc


def save_failure(out: Path, seed: int, case: int, target: str, ops: list, error: str, detail: str) -> Path:
    folder = out / f"seed{seed}-case{case}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_case(folder, target, mutate(target, ops))
    (folder / "FAILURE.txt").write_text(
        f"{error}\ntarget: {target}\nops: {[(k, a, b, p.hex()) for k, a, b, p in ops]}\n\n{detail}")
    return folder


def run_case(work: Path, seed: int, case: int, text_report: bool = False) -> str:
    target, ops = describe_case(seed, case)
    data = mutate(target, ops)
    folder = work / f"case{case % 4}"
    shutil.rmtree(folder, ignore_errors=True)
    return check(write_case(folder, target, data), text_report=text_report)


# -------------------------------------------------------------------- main
def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first case number")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "kvprof-fuzz-failures"))
    p.add_argument("--replay", type=int, metavar="CASE", help="run one case and show its traceback")
    p.add_argument("--max-failures", type=int, default=20)
    return p.parse_args()


def replay(args) -> int:
    target, ops = describe_case(args.seed, args.replay)
    folder = save_failure(Path(args.out), args.seed, args.replay, target, ops, "replay", "")
    print(f"case {args.replay}: {target} {[(k, a, b, p.hex()) for k, a, b, p in ops]}")
    print(f"files in {folder}")
    try:
        print("outcome:", check(folder / MAIN, text_report=True))
    except Failure:
        traceback.print_exc()
        return 1
    return 0


def fuzz(args) -> int:
    from kvprof.analysis import load_kernels

    load_kernels()
    out = Path(args.out)
    outcomes: Counter = Counter()
    failures = 0
    warned = 0
    deadline = time.monotonic() + args.minutes * 60
    start = time.monotonic()
    case = args.start
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as work:
        while time.monotonic() < deadline and failures < args.max_failures:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    outcomes[run_case(Path(work), args.seed, case, text_report=case % 10 == 0)] += 1
                except Failure as exc:
                    failures += 1
                    outcomes["FAILURE"] += 1
                    target, ops = describe_case(args.seed, case)
                    folder = save_failure(out, args.seed, case, target, ops, str(exc),
                                          "".join(traceback.format_exception(exc.__cause__ or exc)))
                    print(f"FAILURE case {case}: {exc}\n  saved in {folder}\n  replay: "
                          f"python benchmarks/fuzz_reader.py --seed {args.seed} --replay {case}",
                          flush=True)
            warned += bool(caught)
            case += 1
    elapsed = time.monotonic() - start
    n = case - args.start
    print(f"\n{n} cases in {elapsed:.1f} s: {n / elapsed:.1f} cases/s, {failures} failures, "
          f"{warned} cases with Python warnings (seed {args.seed}, cases {args.start}..{case - 1})")
    for outcome, count in outcomes.most_common():
        print(f"  {count:>7}  {outcome}")
    return 1 if failures else 0


def main() -> int:
    args = parse_args()
    return replay(args) if args.replay is not None else fuzz(args)


if __name__ == "__main__":
    sys.exit(main())
