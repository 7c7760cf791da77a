#!/usr/bin/env python
"""GPU check: short lifelong ZsRE runs on CUDA through the normal command line, recording the
device, seconds per edit and peak GPU memory. Started by ``tools/gpu_check.sh`` (which finds
the model, data and wheels); writes ``OUT/gpu_check.json`` after every run and
``OUT/gpu_check.md`` at the end.

    python tools/gpu_check.py --out runs/gpu_check --smollm2 smollm2 [--llama PATH] [--data FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_cli(name: str, argv: list[str], runs_dir: Path) -> dict:
    """One ``fit`` in this process; the peak GPU memory is this run's alone."""
    import torch

    from repair_pl.cli import EditCLI

    out = runs_dir / name
    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    extra = shlex.split(os.environ.get("GPU_CHECK_EXTRA", ""))  # e.g. "--model.max_steps 2" for a dry run
    cli = EditCLI(args=["fit", *argv, *extra, "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
                        "--trainer.logger", "false", "--checkpoint_every", "null"],
                  parser_kwargs={"default_env": False})
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    module = cli.model
    result = {"name": name, "method": summary["method"], "argv": argv, "wall_s": round(wall, 1),
              "seconds_per_edit": summary["seconds_per_edit"], "steps_per_edit": summary["steps_per_edit"],
              "n_edits": summary["n_edits"], "T": summary["T"], "n_failed": summary["n_failed"],
              "pre": summary["pre"], "post": summary["post"],
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
              "input_device": str(module.device), "side_memory_device": str(module.memory.side.device),
              "side_memory_dtype": str(module.memory.side.dtype),
              "frozen_dtype": str(module.memory.main.weight.dtype),
              "post_rewrite_acc_per_case": [c["post"]["rewrite_acc"] for c in
                                            json.loads((out / "results.json").read_text())]}
    del cli, module
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    parser.add_argument("--runs", default="/tmp/gpu_check_runs", help="where the runs' own folders go")
    parser.add_argument("--smollm2", default="smollm2", help="model.model for the SmolLM2 runs")
    parser.add_argument("--weights", default="SmolLM2-135M-Instruct", help="what --smollm2 holds (for the report)")
    parser.add_argument("--data", default="data/zsre/zsre_edit_1000.json")
    parser.add_argument("--llama", default=None, help="a local Llama-3-8B-Instruct folder (else skipped)")
    parser.add_argument("--n", type=int, default=20, help="records of the SmolLM2 run")
    parser.add_argument("--budget", type=float, default=270, help="seconds; later runs are skipped past it")
    parser.add_argument("--accelerator", default="gpu", help="cpu: a dry run of this script without a GPU")
    args = parser.parse_args()

    import torch
    import transformers

    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                    "smollm2": args.smollm2, "weights": args.weights, "data": args.data, "runs": [], "skipped": []}
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        report["skipped"].append("no CUDA device: nothing run")
        _write(out, report)
        sys.exit(1)
    common = ["--data.path", args.data, "--trainer.accelerator", args.accelerator, "--T", "10"]
    plans = [
        ("smollm2_bf16", ["--config", "configs/zsre.yaml", "--model.model", args.smollm2, "--model.dtype", "bfloat16",
                          "--data.ds_size", str(args.n), *common]),
        # the device_map path (accelerate hooks) on one GPU: the same first chunk as above
        ("smollm2_bf16_device_map", ["--config", "configs/zsre.yaml", "--model.model", args.smollm2,
                                     "--model.dtype", "bfloat16", "--model.device_map", "auto",
                                     "--data.ds_size", "10", *common]),
    ]
    if args.llama:
        plans.append(("llama3_8b_bf16", ["--config", "configs/llama3_8b.yaml", "--model.model", args.llama,
                                          "--data.ds_size", "10", *common]))
    else:
        report["skipped"].append("Llama-3-8B: no local weights found (set LLAMA3_8B_PATH to a model folder)")
    for name, argv in plans:
        if time.perf_counter() - start > args.budget:
            report["skipped"].append(f"{name}: over the {args.budget:.0f} s budget")
            continue
        print(f"== {name}: {' '.join(argv)}", flush=True)
        try:
            report["runs"].append(run_cli(name, argv, runs))
        except BaseException as err:  # noqa: BLE001 - record and go on with the next run
            if isinstance(err, KeyboardInterrupt):
                raise
            report["runs"].append({"name": name, "argv": argv, "error": f"{type(err).__name__}: {err}",
                                   "traceback": traceback.format_exc()[-3000:]})
            print(report["runs"][-1]["traceback"], file=sys.stderr, flush=True)
        _write(out, report)
    runs_by_name = {r["name"]: r for r in report["runs"] if "error" not in r}
    if {"smollm2_bf16", "smollm2_bf16_device_map"} <= set(runs_by_name):
        a = runs_by_name["smollm2_bf16"]["post_rewrite_acc_per_case"][:10]
        b = runs_by_name["smollm2_bf16_device_map"]["post_rewrite_acc_per_case"]
        report["device_map_same_rewrite_acc_cases"] = f"{sum(x == y for x, y in zip(a, b))}/{len(b)}"
    report["total_s"] = round(time.perf_counter() - start, 1)
    _write(out, report)
    print((out / "gpu_check.md").read_text(), flush=True)
    sys.exit(1 if any("error" in r for r in report["runs"]) else 0)


def _write(out: Path, report: dict) -> None:
    from repair_pl.checkpoint import write_file_atomic, write_json_atomic

    write_json_atomic(out / "gpu_check.json", report, indent=1)
    lines = [f"# GPU check on {report['device']}", "",
             f"torch {report['torch']} (CUDA {report['cuda']}), transformers {report['transformers']}; "
             f"SmolLM2 weights: {report['weights']}; data: {report['data']}", "",
             "| run | method | edits (T) | s/edit | steps/edit | peak GPU memory (GiB) | post Rel. | post Gen. | post Loc. | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} | | | | | | | | |")
            continue
        post = r["post"]
        lines.append(f"| {r['name']} | {r.get('method', '')} | {r['n_edits']} ({r['T']}) | {r['seconds_per_edit']:.3f} | "
                     f"{r['steps_per_edit']:.1f} | {r['peak_memory_gib']:.2f} | {post.get('rewrite_acc', float('nan')):.3f} | "
                     f"{post.get('rephrase_acc', float('nan')):.3f} | {post.get('locality', float('nan')):.3f} | "
                     f"{r['wall_s']} |")
    lines.append("")
    for r in report["runs"]:
        if "error" not in r:
            lines.append(f"- {r['name']}: inputs on {r['input_device']}, side memory {r['side_memory_dtype']} on "
                         f"{r['side_memory_device']}, frozen weights {r['frozen_dtype']}")
    if "device_map_same_rewrite_acc_cases" in report:
        lines.append(f"- device_map run vs plain run, first chunk: {report['device_map_same_rewrite_acc_cases']} "
                     f"cases with the same post rewrite accuracy")
    lines += [f"- skipped: {s}" for s in report["skipped"]]
    write_file_atomic(out / "gpu_check.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
