"""``kvprof info PATH``: what a trace holds, without reading more than needed."""
from __future__ import annotations

import json


class InfoCommand:
    """Show a trace's format and vLLM versions, model, tables, time span and losses."""

    name = "info"
    help = "what is in a trace (versions, model, tables, time span, dropped rows)"

    def add_arguments(self, parser) -> None:
        parser.add_argument("path", help="trace file written by kvprof")
        parser.add_argument("--json", action="store_true", help="print JSON")

    def run(self, args) -> int:
        from kvprof.format.reader import read_trace
        trace = read_trace(args.path)
        info = describe(trace)
        if args.json:
            print(json.dumps(info, indent=2, sort_keys=True))
        else:
            print(render(info))
        return 0


def describe(trace) -> dict:
    from kvprof.format import schema as S
    steps = trace["steps"]
    span = 0.0
    if steps.num_rows:
        start = steps.column("t_schedule_start_ns")[0].as_py()
        end = steps.column("t_update_end_ns")[-1].as_py()
        span = (end - start) / 1e9
    run = trace.run
    return {
        "path": trace.path,
        "format_version": trace.format_version,
        "kvprof_version": run.get("kvprof_version"),
        "vllm_version": run.get("vllm_version"),
        "model": run.get("model", {}),
        "kv": {k: v for k, v in run.get("kv", {}).items() if k != "groups"},
        "engine": run.get("engine", {}),
        "tables": {name: table.num_rows for name, table in trace.tables.items()
                   if table.num_rows or name not in S.OPTIONAL_TABLES},   # host_*: only when sampled
        "duration_s": round(span, 6),
        "collector": collector_status(trace),
        "forward_rows_by_rank": forward_rows_by_rank(trace),
        "complete": trace.complete,
        "rows_dropped": trace.rows_dropped,
        "warnings": trace.warnings,
    }


def render(info: dict) -> str:
    model, kv, engine = info["model"], info["kv"], info["engine"]
    lines = [
        f"trace        {info['path']}",
        f"format       {info['format_version']} (kvprof {info['kvprof_version']}, vLLM {info['vllm_version']})",
        f"model        {model.get('model')} — {model.get('layers')} layers, "
        f"{model.get('num_kv_heads')} KV heads x {model.get('head_size')}, {model.get('dtype')}",
        f"KV cache     {kv.get('usable_blocks')} blocks of {kv.get('block_size')} tokens, "
        f"{kv.get('bytes_per_block')} bytes per block",
        f"engine       max_num_seqs={engine.get('max_num_seqs')} "
        f"max_num_batched_tokens={engine.get('max_num_batched_tokens')} "
        f"prefix_caching={engine.get('prefix_caching')}",
        f"time span    {info['duration_s']:.3f} s",
        f"collector    {render_collector(info['collector'])}",
        "tables       " + ", ".join(f"{k}={v}" for k, v in info["tables"].items()),
        "ranks        " + (", ".join(f"{r}: {n} forwards" for r, n in info["forward_rows_by_rank"].items())
                           or "no forward rows"),
        f"complete     {info['complete']}"
        + (f" (dropped rows: {info['rows_dropped']})" if info["rows_dropped"] else ""),
    ]
    lines += [f"warning      {w}" for w in info["warnings"]]
    return "\n".join(lines)


def forward_rows_by_rank(trace) -> dict[str, int]:
    """Forward rows per worker rank: with tensor/pipeline parallelism, one per rank per step."""
    import pyarrow.compute as pc
    counts = pc.value_counts(trace["forward"].column("rank")).to_pylist()
    return {str(c["values"]): c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


def collector_status(trace) -> list[dict]:
    """Per worker: whether the CUPTI collector ran (its status at start, its counters at the end)."""
    out = []
    for worker in trace.run.get("workers", []):
        status = worker.get("collector")
        rank = worker.get("rank")
        end = trace.end_records.get(f"worker-{rank}", {}).get("collector")
        entry = {"rank": rank, **(status if isinstance(status, dict) else {"active": None})}
        if isinstance(end, dict):
            entry["end"] = end
        out.append(entry)
    return out


def render_collector(workers: list[dict]) -> str:
    if not workers:
        return "no worker recorded"
    if all(w.get("active") is None for w in workers):
        return "not recorded (a trace written before format 1.1)"
    active = [w for w in workers if w.get("active")]
    if not active:
        reasons = sorted({str(w.get("reason")) for w in workers})
        return "inactive: " + "; ".join(reasons)
    gave_way = sorted({w["end"]["gave_way"] for w in active if (w.get("end") or {}).get("gave_way")})
    libraries = sorted({str(w.get("library")) for w in active})
    text = f"active on {len(active)} of {len(workers)} worker(s) ({', '.join(libraries)})"
    return text + (f"; {'; '.join(gave_way)}" if gave_way else "")
