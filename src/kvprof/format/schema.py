"""The kvprof trace format: the one place where tables, columns and the version live.

A trace is a main Arrow IPC *stream* file (the ``steps`` table, written by the
EngineCore) plus a sibling folder ``<path>.parts/`` holding one Arrow IPC stream
per other table (and one ``forward`` file per worker process). Streams, not IPC
files, because a stream killed mid-write is still readable up to its last
complete record batch; the format version sits in each stream's *schema*
metadata, which is written first and so survives a crash.

Minor versions only add columns: a reader ignores columns it does not know, and
gives a default to a column that an older minor version lacked (``ADDED_COLUMNS``:
null). A table added in a minor version (``OPTIONAL_TABLES``) reads as empty from an
older trace, without a warning. A new major version means a reader of an older major
refuses the file. 1.1 added the CUPTI collector's per-category device times to
``forward``, and the py-spy tables ``host_samples`` and ``host_frames``.
"""
from __future__ import annotations

import pyarrow as pa

FORMAT_MAJOR = 1
FORMAT_MINOR = 1   # 1.1: forward device-time columns; host_samples and host_frames
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

META_FORMAT = b"kvprof.format_version"
META_TABLE = b"kvprof.table"
META_RUN = b"kvprof.run"          # JSON run metadata (main file and worker files)
META_WRITER = b"kvprof.writer"    # "engine_core" or "worker-<rank>"

PARTS_SUFFIX = ".parts"

# Phases of a request within one step (request_steps.phase).
PHASE_PREFILL = 0     # first scheduling of a new request (may be a first chunk)
PHASE_CHUNKED = 1     # continuation of a prompt that did not fit in one step
PHASE_DECODE = 2      # one new token after the prompt was computed
PHASE_RESUMED = 3     # re-admitted after preemption: starts recomputing prompt + outputs
PHASE_RECOMPUTE = 4   # a later chunk of that recomputation (the step did not fit it all)
PHASE_NAMES = ("prefill", "chunked_prefill", "decode", "resumed", "recompute")

# Block event kinds (block_events.kind).
BLOCK_ALLOC = 0       # taken from the free queue (may evict a cached block)
BLOCK_FREE = 1        # reference count reached zero, back in the free queue
BLOCK_REVIVE = 2      # prefix-cache hit on a free cached block: taken back
BLOCK_EVICT = 3       # a cached block's hash dropped so the block can be reused
BLOCK_EVENT_NAMES = ("alloc", "free", "revive", "evict")

_i8, _u8, _i16, _i32, _i64 = pa.int8(), pa.uint8(), pa.int16(), pa.int32(), pa.int64()


def _fields(*cols: tuple[str, pa.DataType]) -> list[pa.Field]:
    return [pa.field(name, typ, nullable=False) for name, typ in cols]


STEPS = _fields(
    ("step", _i32),                   # step number within the trace, from 0
    ("t_schedule_start_ns", _i64),    # time.monotonic_ns(), shared by all processes
    ("t_schedule_end_ns", _i64),
    ("t_update_start_ns", _i64),      # update_from_output entered (forward done)
    ("t_update_end_ns", _i64),        # outputs of the step are ready
    ("num_running", _i32),            # after scheduling
    ("num_waiting", _i32),
    ("num_prefill_reqs", _i32),       # phase counts, see PHASE_*
    ("num_chunked_reqs", _i32),       # chunked-prefill and recompute continuations
    ("num_decode_reqs", _i32),
    ("num_resumed_reqs", _i32),
    ("prefill_tokens", _i32),         # tokens scheduled in prefill / chunked / resumed phases
    ("decode_tokens", _i32),
    ("total_tokens", _i32),           # total scheduled tokens (the token budget's use)
    ("kv_blocks_used", _i32),         # at update end; excludes the null block
    ("kv_blocks_free", _i32),         # free queue length (includes cached-evictable)
    ("kv_blocks_cached", _i32),       # prefix-cache hash entries (about the blocks holding a hash)
    ("blocks_allocated", _i32),       # in this step's window: previous update end .. this update end
    ("blocks_freed", _i32),
    ("blocks_revived", _i32),
    ("blocks_evicted", _i32),
    ("prefix_hit_tokens", _i32),      # prompt tokens served from the prefix cache
    ("preemptions", _i32),
    ("preempted_tokens", _i32),       # computed tokens thrown away by those preemptions
    ("finished", _i32),               # requests that finished in this step
    ("rss_bytes", _i64),              # EngineCore process RSS (sampled, carried forward)
    ("hook_ns", _i32),                # kvprof's own time in EngineCore hooks in this step
)

REQUEST_STEPS = _fields(
    ("step", _i32),
    ("req", _i32),                    # request index, see requests.req
    ("phase", _u8),                   # PHASE_*
    ("tokens", _i32),                 # tokens scheduled for this request in this step
    ("computed", _i32),               # tokens already computed before this step
    ("new_blocks", _i16),             # KV blocks added to its block table in this step
                                      # (prefill / resumed rows: the whole table, prefix hits included)
)

REQUESTS = _fields(
    ("req", _i32),
    ("request_id", pa.string()),      # vLLM's request id (never prompt text)
    ("arrival_ns", _i64),             # Request.arrival_time mapped onto the monotonic clock
    ("queued_ns", _i64),              # reached the scheduler; -1 if before tracing started
    ("first_scheduled_ns", _i64),     # -1: never scheduled
    ("first_token_ns", _i64),         # -1: no token yet
    ("finish_ns", _i64),              # -1: still running when the trace stopped
    ("first_scheduled_step", _i32),
    ("first_token_step", _i32),
    ("finish_step", _i32),
    ("prompt_tokens", _i32),
    ("cached_prompt_tokens", _i32),   # prefix-cache hit at admission
    ("output_tokens", _i32),
    ("max_tokens", _i32),
    ("preemptions", _i32),
    ("finish_reason", pa.string()),   # vLLM's (stop, length, abort, error, repetition, ...);
                                      # running / waiting: unfinished when tracing stopped
)

BLOCK_EVENTS = _fields(
    ("step", _i32),                   # the step window the event fell in (see steps.blocks_*)
    ("kind", _u8),                    # BLOCK_*
    ("req", _i32),                    # -1 when no request is known
    ("block_id", _i32),
)

PREEMPTIONS = _fields(
    ("step", _i32),
    ("t_ns", _i64),
    ("req", _i32),
    ("computed_tokens", _i32),        # thrown away, recomputed on resume
    ("blocks_freed", _i32),
    ("kv_blocks_used", _i32),         # just before the preemption
)

PROMPTS = [  # rows only with record_prompts=True (the file is always there, empty otherwise)
    pa.field("req", _i32, nullable=False),
    pa.field("prompt_token_ids", pa.list_(_i32), nullable=False),
]

FORWARD = [
    pa.field("step", _i32, nullable=False),   # -1: a forward outside traced steps
    pa.field("rank", _i32, nullable=False),
    pa.field("t_start_ns", _i64, nullable=False),
    pa.field("t_end_ns", _i64, nullable=False),
    pa.field("device_ns", _i64, nullable=True),       # CUDA events; null on CPU
    pa.field("rss_bytes", _i64, nullable=False),      # worker process RSS
    pa.field("hook_ns", _i32, nullable=False),        # kvprof's own time in the worker hook
    pa.field("gpu_used_bytes", _i64, nullable=True),  # NVML device memory in use
    pa.field("torch_allocated_bytes", _i64, nullable=True),
    pa.field("torch_reserved_bytes", _i64, nullable=True),
    pa.field("torch_peak_bytes", _i64, nullable=True),
    # 1.1: the CUPTI collector's device time of the step's kernels by category (rules:
    # kvprof.recorder.kernels); null where the collector did not run or saw no record.
    pa.field("dev_gemm_ns", _i64, nullable=True),
    pa.field("dev_attention_ns", _i64, nullable=True),
    pa.field("dev_comm_ns", _i64, nullable=True),     # NCCL and custom all-reduce
    pa.field("dev_memcpy_ns", _i64, nullable=True),   # memcpy and memset records
    pa.field("dev_other_ns", _i64, nullable=True),    # sampling, elementwise, the rest
    pa.field("dev_records", _i32, nullable=True),     # kernel + memcpy + memset records summed
]

# Host stacks sampled by py-spy (format 1.1; files only when sampling was on). py-spy
# merges consecutive samples of a thread with the same stack: a row is one such run.
HOST_SAMPLES = _fields(
    ("t_ns", _i64),                   # first sample of the run, time.monotonic_ns()
    ("duration_ns", _i64),            # until the thread's stack changed (or sampling ended)
    ("pid", _i32),                    # operating-system process id
    ("process", pa.string()),         # "engine_core" or "worker-<rank>"
    ("tid", _i64),                    # operating-system thread id
    ("thread", pa.string()),          # Python thread name (MainThread, ...)
    ("stack", pa.list_(pa.field("item", _i32, nullable=False))),  # frame ids, innermost first
)

HOST_FRAMES = _fields(
    ("frame", _i32),                  # id used in host_samples.stack
    ("function", pa.string()),        # qualified name as py-spy reports it
    ("file", pa.string()),            # full path of the source file
    ("line", _i32),                   # line of the first sample of the run (0: unknown)
)

TABLES: dict[str, list[pa.Field]] = {
    "steps": STEPS,
    "request_steps": REQUEST_STEPS,
    "requests": REQUESTS,
    "block_events": BLOCK_EVENTS,
    "preemptions": PREEMPTIONS,
    "prompts": PROMPTS,
    "forward": FORWARD,
    "host_samples": HOST_SAMPLES,
    "host_frames": HOST_FRAMES,
}

# Columns a minor version added, by table, with the version that added them: a file
# written before has them null.
ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "forward": {name: "1.1" for name in ("dev_gemm_ns", "dev_attention_ns", "dev_comm_ns",
                                         "dev_memcpy_ns", "dev_other_ns", "dev_records")},
}

# Tables a minor version added: absent in older traces (and when not recorded) without a warning.
OPTIONAL_TABLES = ("host_samples", "host_frames")

# Tables in the parts folder; "forward" has one file per worker rank.
PART_FILES = {name: f"{name}.arrow" for name in TABLES if name not in ("steps", "forward")}


def forward_file(rank: int) -> str:
    return f"forward-{rank}.arrow"


def schema_for(table: str, *, writer: str, run_json: str | None = None) -> pa.Schema:
    """The Arrow schema of ``table`` with kvprof's metadata attached."""
    meta = {META_FORMAT: FORMAT_VERSION.encode(), META_TABLE: table.encode(),
            META_WRITER: writer.encode()}
    if run_json is not None:
        meta[META_RUN] = run_json.encode()
    return pa.schema(TABLES[table], metadata=meta)


def column_names(table: str) -> list[str]:
    return [f.name for f in TABLES[table]]


# Summary files (``kvprof analyze --summary``, ``kvprof merge``): one Arrow IPC file, one
# row per latency kind holding its mergeable percentile summary (``analysis/quantiles.py``:
# exact values and counts, or bucket counts), the totals in the schema metadata (JSON).
SUMMARY_VERSION = "1.0"
META_SUMMARY_VERSION = b"kvprof.summary_version"
META_SUMMARY = b"kvprof.summary"
SUMMARY = _fields(
    ("kind", pa.string()),               # ttft, tpot, itl, e2e, queue
    ("count", pa.int64()),               # values, counts included
    ("total", pa.float64()),             # their sum (ms)
    ("min", pa.float64()),
    ("max", pa.float64()),
    ("exact_max", pa.int64()),           # distinct values kept exactly before folding
) + [
    pa.field("values", pa.list_(pa.float64())),  # exact: the distinct values (ms); null once folded
    pa.field("counts", pa.list_(pa.int64())),    # exact: how often each value was seen
    pa.field("buckets", pa.list_(pa.int64())),   # folded: counts per logarithmic bucket; null if exact
]
