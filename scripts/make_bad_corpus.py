"""Build tests/data/bad/: files that are not (good) kvprof traces, and what kvprof must say.

    python scripts/make_bad_corpus.py [OUT]      (default: tests/data/bad)

Deterministic: the same pyarrow gives the same bytes. Every case is derived from
the golden trace (tests/data/golden-1.0/). A case is a main file, plus its
``<name>.parts/`` folder when the case needs one. MANIFEST.json records, per case
and per command (``kvprof info``, ``kvprof analyze``), the exit code and a fragment
of the one error line (exit 2) or of the output (exit 0: a salvaged trace or one
with nothing to analyse) that tests/unit/test_bad_corpus.py asserts.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden-1.0" / "trace.arrow"
GOLDEN_PARTS = Path(str(GOLDEN) + ".parts")
OUT = ROOT / "tests" / "data" / "bad"

GOLDEN_BYTES = GOLDEN.read_bytes()
GOLDEN_STEPS = ipc.open_stream(GOLDEN_BYTES).read_all()
GOLDEN_META = dict(GOLDEN_STEPS.schema.metadata)
SMALL_STEPS = GOLDEN_STEPS.slice(0, 8)   # enough rows for a main file refused on sight


def message_ends(data: bytes) -> list[int]:
    """Byte offset at which each IPC message (schema, then batches) ends."""
    source = pa.BufferReader(data)
    return [source.tell() for _ in ipc.MessageReader.open_stream(source)]


SCHEMA_END, *BATCH_ENDS = message_ends(GOLDEN_BYTES)


# ------------------------------------------------------------------ byte builders
def stream_bytes(table: pa.Table, metadata: dict | None = None, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    schema = table.schema.with_metadata(metadata) if metadata is not None else table.schema
    with ipc.new_stream(sink, schema, options=ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def steps_with_meta(**changes: bytes) -> bytes:
    """A few golden steps rows with some kvprof.* metadata entries replaced."""
    meta = dict(GOLDEN_META)
    meta.update({f"kvprof.{k}".encode(): v for k, v in changes.items()})
    return stream_bytes(SMALL_STEPS, meta)


def with_column(table: pa.Table, name: str, field: pa.Field, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), field, values)


def golden_part(name: str) -> pa.Table:
    return ipc.open_stream((GOLDEN_PARTS / name).read_bytes()).read_all()


def part_with(name: str, table: pa.Table) -> bytes:
    """A part file holding ``table`` with the golden part's metadata."""
    return stream_bytes(table, dict(golden_part(name).schema.metadata), compression="zstd")


def parquet_bytes() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(SMALL_STEPS.replace_schema_metadata(None), sink)
    return sink.getvalue().to_pybytes()


def ipc_file_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def flipped(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << (offset % 8)
    return bytes(out)


def golden_parts(replaced: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The golden parts folder, some files replaced."""
    files = {p.name: p.read_bytes() for p in sorted(GOLDEN_PARTS.iterdir())}
    files.update(replaced or {})
    return files


def end_record(writer: str, **changes) -> bytes:
    record = json.loads((GOLDEN_PARTS / f"end-{writer}.json").read_bytes())
    record.update(changes)
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


def empty_stream(table: str) -> bytes:
    """What a real recorder leaves for a table it never wrote a row to (zstd, zero-row batch)."""
    from kvprof.format import schema as S
    golden = GOLDEN_PARTS / S.PART_FILES.get(table, "forward-0.arrow")
    meta = dict(GOLDEN_META) if table == "steps" else \
        dict(ipc.open_stream(golden.read_bytes()).schema.metadata)
    schema = pa.schema(S.TABLES[table], metadata=meta)
    return stream_bytes(schema.empty_table(), meta, compression="zstd")


# ------------------------------------------------------------------ the cases
def refused(fragment: str) -> dict:
    """Both commands: exit 2, the one error line holds ``fragment``."""
    return {"info": {"exit": 2, "stderr": fragment}, "analyze": {"exit": 2, "stderr": fragment}}


def cases() -> dict[str, dict]:
    """name -> {what, main (bytes), parts ({file: bytes}), info, analyze}."""
    from kvprof.format import schema as S

    rows_cut = (BATCH_ENDS[3] + BATCH_ENDS[4]) // 2
    steps_reversed = GOLDEN_STEPS.take(pa.array(range(GOLDEN_STEPS.num_rows - 1, -1, -1)))
    nulls = SMALL_STEPS.column("t_schedule_start_ns").to_pylist()
    nulls[3] = None
    request_steps = golden_part("request_steps.arrow")
    requests = golden_part("requests.arrow")
    run = json.loads(GOLDEN_META[b"kvprof.run"])
    zero_steps_parts = {S.PART_FILES[t]: empty_stream(t) for t in S.PART_FILES if t not in S.OPTIONAL_TABLES}
    zero_steps_parts["forward-0.arrow"] = empty_stream("forward")
    zero_steps_parts["end-engine_core.json"] = end_record(
        "engine_core", rows_written={}, steps=0, requests_seen=0)
    zero_steps_parts["end-worker-0.json"] = end_record("worker-0", rows_written={})
    return {
        "empty.arrow": {"what": "an empty file", "main": b"", **refused("empty file")},
        "random-bytes.bin": {
            "what": "4 KiB of random bytes", "main": random.Random(0).randbytes(4096),
            **refused("not an Arrow IPC file (unknown binary content)")},
        "steps.csv": {
            "what": "a CSV file", "main": b"step,total_tokens\n0,12\n1,40\n",
            **refused("not an Arrow IPC file (it looks like text)")},
        "steps.parquet": {
            "what": "a Parquet file of the steps table", "main": parquet_bytes(),
            **refused("not an Arrow IPC file (it is a Parquet file)")},
        "other-schema-stream.arrow": {
            "what": "an Arrow IPC stream of another schema",
            "main": stream_bytes(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})),
            **refused("an Arrow file, but not a kvprof trace (no format version)")},
        "other-schema-file.arrow": {
            "what": "an Arrow IPC file (random access format) of another schema",
            "main": ipc_file_bytes(pa.table({"a": [1, 2, 3]})),
            **refused("an Arrow file, but not a kvprof trace (no format version)")},
        "future-major-2.0.arrow": {
            "what": "a trace of kvprof format 2.0", "main": steps_with_meta(format_version=b"2.0"),
            **refused("written by kvprof format 2.0, newer than this reader")},
        "bad-version.arrow": {
            "what": "format version that is not a number", "main": steps_with_meta(format_version=b"one"),
            **refused("bad kvprof format version b'one'")},
        "wrong-table.arrow": {
            "what": "a requests stream given as the main file", "main": steps_with_meta(table=b"requests"),
            **refused("holds kvprof table 'requests', expected 'steps'")},
        "wrong-type-int64.arrow": {
            "what": "steps.step stored as int64",
            "main": stream_bytes(with_column(SMALL_STEPS, "step", pa.field("step", pa.int64(), False),
                                             SMALL_STEPS.column("step").cast(pa.int64())), GOLDEN_META),
            **refused("column steps.step has type int64, expected int32")},
        "wrong-type-string.arrow": {
            "what": "steps.total_tokens stored as strings",
            "main": stream_bytes(with_column(
                SMALL_STEPS, "total_tokens", pa.field("total_tokens", pa.string()),
                SMALL_STEPS.column("total_tokens").cast(pa.string())), GOLDEN_META),
            **refused("column steps.total_tokens has type string, expected int32")},
        "missing-column.arrow": {
            "what": "steps without hook_ns",
            "main": stream_bytes(SMALL_STEPS.drop_columns(["hook_ns"]), GOLDEN_META),
            **refused("column steps.hook_ns is missing")},
        "nulls.arrow": {
            "what": "a null in a non-nullable steps column",
            "main": stream_bytes(with_column(SMALL_STEPS, "t_schedule_start_ns",
                                             pa.field("t_schedule_start_ns", pa.int64()),
                                             pa.array(nulls, pa.int64())), GOLDEN_META),
            **refused("column steps.t_schedule_start_ns has nulls (1 of ")},
        "run-not-json.arrow": {
            "what": "run metadata that is not JSON", "main": steps_with_meta(run=b"{not json"),
            **refused("run metadata is not valid JSON")},
        "truncated-in-prefix.arrow": {
            "what": "the golden main file cut 6 bytes in", "main": GOLDEN_BYTES[:6],
            **refused("unreadable Arrow stream")},
        "truncated-in-schema.arrow": {
            "what": "the golden main file cut inside its schema message",
            "main": GOLDEN_BYTES[:SCHEMA_END // 2], **refused("unreadable Arrow stream")},
        "bitflip-in-schema.arrow": {
            "what": "one bit flipped in the schema message (a field's integer width)",
            "main": flipped(GOLDEN_BYTES, 1843), **refused("unreadable Arrow stream")},
        "bitflip-in-first-batch.arrow": {
            "what": "one bit flipped in the first batch's header (a buffer length): salvaged, no steps",
            "main": flipped(GOLDEN_BYTES, 5529),
            "info": {"exit": 0, "stdout": "bitflip-in-first-batch.arrow: cut after 1 complete batches ("},
            "analyze": {"exit": 2, "stderr": "the trace holds no steps (empty trace) (reader: "
                                             "bitflip-in-first-batch.arrow: cut after 1 complete batches"}},
        "steps-out-of-order.arrow": {
            "what": "steps rows in reverse order",
            "main": stream_bytes(steps_reversed, GOLDEN_META, compression="zstd"),
            "info": {"exit": 0, "stdout": "steps=82"},
            "analyze": {"exit": 2, "stderr": "steps row 1 (step 80): step numbers or times out of order"}},
        # --- with a parts folder
        "truncated-mid-batch.arrow": {
            "what": "the golden trace with its main file cut inside the fifth batch (a crash)",
            "main": GOLDEN_BYTES[:rows_cut], "parts": golden_parts(),
            "info": {"exit": 0, "stdout": "steps: 41 rows on disk, 82 written: the file was cut"},
            "analyze": {"exit": 0, "stderr": "kvprof: warning: truncated-mid-batch.arrow: "
                                             "cut after 4 complete batches ("}},
        "zero-steps.arrow": {
            "what": "a trace closed before its first step (every table empty)",
            "main": empty_stream("steps"), "parts": zero_steps_parts,
            "info": {"exit": 0, "stdout": "tables       steps=0, request_steps=0, requests=0"},
            "analyze": {"exit": 2, "stderr": "the trace holds no steps (empty trace)"}},
        "zero-requests.arrow": {
            "what": "steps, but no request rows at all",
            "main": GOLDEN_BYTES,
            "parts": golden_parts({
                "request_steps.arrow": empty_stream("request_steps"),
                "requests.arrow": empty_stream("requests"),
                "block_events.arrow": empty_stream("block_events"),
                "end-engine_core.json": end_record("engine_core", rows_written={"steps": 82},
                                                   requests_seen=0)}),
            "info": {"exit": 0, "stdout": "request_steps=0, requests=0"},
            "analyze": {"exit": 2, "stderr": "no request finished in the trace (0 requests recorded)"}},
        "part-text.arrow": {
            "what": "requests.arrow holds CSV text", "main": GOLDEN_BYTES,
            "parts": {"requests.arrow": b"req,request_id\n0,a\n"},
            **refused("part-text.arrow.parts/requests.arrow: not an Arrow IPC file (it looks like text)")},
        "part-wrong-type.arrow": {
            "what": "request_steps.tokens stored as int64", "main": GOLDEN_BYTES,
            "parts": {"request_steps.arrow": part_with("request_steps.arrow", with_column(
                request_steps, "tokens", pa.field("tokens", pa.int64(), False),
                request_steps.column("tokens").cast(pa.int64())))},
            **refused("column request_steps.tokens has type int64, expected int32")},
        "part-future-major.arrow": {
            "what": "requests.arrow written by kvprof format 2.0", "main": GOLDEN_BYTES,
            "parts": {"requests.arrow": stream_bytes(requests, {
                **requests.schema.metadata, b"kvprof.format_version": b"2.0"})},
            **refused("requests.arrow: written by kvprof format 2.0, newer than this reader")},
        "part-forward-garbage.arrow": {
            "what": "forward-0.arrow holds random bytes", "main": GOLDEN_BYTES,
            "parts": {"forward-0.arrow": random.Random(1).randbytes(500)},
            **refused("forward-0.arrow: not an Arrow IPC file (unknown binary content)")},
        "part-request-index-out-of-range.arrow": {
            "what": "a request index far beyond the number of requests", "main": GOLDEN_BYTES,
            "parts": golden_parts({"requests.arrow": part_with("requests.arrow", with_column(
                requests, "req", pa.field("req", pa.int32(), False),
                pa.array([10**9] + requests.column("req").to_pylist()[1:], pa.int32())))}),
            "info": {"exit": 0, "stdout": "requests=12"},
            "analyze": {"exit": 2, "stderr": "request index 1000000000 is out of range (corrupt trace?)"}},
        "end-record-bad-counts.arrow": {
            "what": "end records whose row counts are not numbers (read, not complete)",
            "main": GOLDEN_BYTES,
            "parts": golden_parts({"end-engine_core.json": end_record(
                "engine_core", rows_dropped={"steps": "x", "requests": None}, rows_written=[1, 2])}),
            "info": {"exit": 0, "stdout": "complete     False"},
            "analyze": {"exit": 0, "stdout": "Throughput"}},
        "run-kv-not-object.arrow": {
            "what": "run metadata whose kv entry is a number, and a block size that is text",
            "main": steps_with_meta(run=json.dumps({**run, "kv": 3, "engine": {
                **run["engine"], "max_num_seqs": "eight"}}, sort_keys=True).encode()),
            "parts": golden_parts(),
            "info": {"exit": 0, "stdout": "run metadata: kv is not a JSON object; ignored"},
            "analyze": {"exit": 0, "stderr": "kvprof: warning: run metadata: engine.max_num_seqs = "
                                             "'eight' is not a count; ignored"}},
    }


def write(out: Path) -> dict:
    """Write every case under ``out`` (emptied first) and return the manifest."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest = {"generator": "scripts/make_bad_corpus.py", "pyarrow": pa.__version__, "cases": {}}
    for name, case in cases().items():
        (out / name).write_bytes(case["main"])
        for part, data in case.get("parts", {}).items():
            path = out / f"{name}.parts" / part
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
        manifest["cases"][name] = {key: case[key] for key in ("what", "info", "analyze")}
        manifest["cases"][name]["parts"] = sorted(case.get("parts", {}))
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    manifest = write(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(manifest['cases'])} cases, {size:,} bytes in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
