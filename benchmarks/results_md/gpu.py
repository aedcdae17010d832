"""Tables of ``raymoe.benchmarks.gpu`` (core, nccl, deployment), from the files of the leased GPU
runs as they were written."""

from __future__ import annotations

from raymoe.benchmarks.results_md.source import Result
from raymoe.benchmarks.results_md.tables import md_table

NCCL_PHASES = ("pack", "dispatch", "experts", "combine", "unpack")


def _dtype(row: dict, result: Result) -> str:
    attention = result.meta.get("bf16_attention")
    return f"{row['dtype']} ({attention})" if row["dtype"] == "bfloat16" and attention else row["dtype"]


def core_table(results: list[Result]) -> str:
    """The reference engine on one GPU against the CPU, per model, dtype and batch (files in order)."""
    rows = [(row, result) for result in results for row in result.rows]
    models = list(dict.fromkeys(row["model"] for row, _ in rows))
    out = []
    for model in models:
        for row, result in rows:
            if row["model"] != model:
                continue
            out.append([model, _dtype(row, result), row["batch"], f"{row['gpu_prefill_ms']:.1f}",
                        f"{row['gpu_decode_step_ms_median']:.1f}", f"{row['gpu_decode_tok_s']:.0f}",
                        f"{row['cpu_decode_step_ms_median']:.1f}", f"{row['same_sequences']}/{row['sequences']}",
                        f"{row['prefill_logits_max_abs_diff']:.1e}"])
    return md_table(["model", "dtype", "batch", "GPU prefill ms", "GPU decode step ms (median)", "GPU decode tok/s",
                     "CPU decode step ms", "same tokens as CPU", "prefill logits max abs diff"], out, "lllrrrrlr")


def bf16_kernels_table(results: list[Result]) -> str:
    """bfloat16 decode step (median ms) per model and batch, one column per file, and the
    first file's over the last's."""
    by_file = [{(r["model"], r["batch"]): r["gpu_decode_step_ms_median"] for r in res.rows if r["dtype"] == "bfloat16"}
               for res in results]
    keys = [k for k in by_file[0] if all(k in f for f in by_file)]
    out = [[model, batch, *(f"{f[(model, batch)]:.1f}" for f in by_file),
            f"{by_file[0][(model, batch)] / by_file[-1][(model, batch)]:.1f}x"] for model, batch in keys]
    header = ["model", "batch", *(f"{r.meta.get('bf16_attention', r.name)}, {r.name}" for r in results),
              "ratio (first / last)"]
    return md_table(header, out, "lr" + "r" * len(results) + "r")


def nccl_table(results: list[Result]) -> str:
    """One MoE layer's round trip through NCCL per dtype and tokens (world 1), and what the
    other worlds did."""
    out, notes = [], []
    for world in results[0].rows:
        if not all(rank.get("ok") for rank in world["ranks"]):
            errors = {_last_error_line(rank.get("error", "not ok")) for rank in world["ranks"]}
            notes.append(f"World {world['world']} ({world['backend']}): failed on every rank: "
                         + "; ".join(f"`{e}`" for e in sorted(errors)) + ".")
            continue
        rank0 = world["ranks"][0]
        for key in rank0:
            if not key.endswith("_round_trip_us"):
                continue
            dtype, tokens = key[: -len("_round_trip_us")].rsplit("_T", 1)
            phases = rank0[f"{dtype}_T{tokens}_phases_us"]
            out.append([dtype, tokens, f"{rank0[key]:.0f}", *(f"{phases[p]:.0f}" for p in NCCL_PHASES)])
    table = md_table(["dtype", "tokens", "round trip µs", "pack", "dispatch (metadata + tokens)", "experts", "combine",
                      "unpack"], out, "lrrrrrrr")
    return "\n\n".join([table, *notes])


def deployment_table(results: list[Result]) -> str:
    """Deployments on the one GPU against the reference engines, per model, case and batch."""
    out = []
    for row in results[0].rows:
        if "error" in row:
            where = "fails at join" if ".join()" in row["error"] else "fails"
            out.append([row["model"], row["case"], "-", "-", "-", "-", "-",
                        f"{where}: `{_last_error_line(row['error']).split(' : ')[0]}`", "-"])
            continue
        cpu, cuda = row.get("vs_cpu_reference"), row.get("vs_cuda_reference")
        same = f"{cpu['same_sequences']}/{cpu['sequences']} / {cuda['same_sequences']}/{cuda['sequences']}" if cpu else "-"
        out.append([row["model"], row["case"], row["batch"], ", ".join(row.get("devices", [])) or "-",
                    f"{row['prefill_ms']:.1f}", f"{row['decode_step_ms_median']:.1f}", f"{row['decode_tok_s']:.0f}",
                    same, f"{cpu['prefill_logits_max_abs_diff']:.1e}" if cpu else "-"])
    return md_table(["model", "engine", "batch", "devices", "prefill ms", "decode step ms (median)", "decode tok/s",
                     "same tokens as CPU ref / CUDA ref", "prefill logits max abs diff vs CPU ref"], out, "llrlrrrlr")


def _last_error_line(error: str) -> str:
    """The most specific line of an exception text (NCCL's is after 'Last error:')."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[-1] if lines else error
