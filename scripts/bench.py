#!/usr/bin/env python
"""Speed and cost bench of lifelong editing, in one process, printed as ratios side by side.

    python scripts/bench.py                              # all parts, quick sizes (~5 min on 2 CPU cores)
    python scripts/bench.py --parts 1 3                  # only some parts
    python scripts/bench.py --full                       # the documented full sizes (docs/benchmarks.md)
    python scripts/bench.py --device cuda --dtype bfloat16 --model /path/to/Meta-Llama-3-8B-Instruct

Parts:
  1. Lightning overhead: ``RepairModule.edit`` (one short ``Trainer.fit`` per edit) against a plain
     torch loop doing the identical steps on the identical batch; both must end with the same
     side-memory weights (checked) so the ratio compares equal work.
  2. REPAIR vs WISE at equal settings on T ZsRE records: seconds and steps per edit, training
     seconds per edit, side-memory size, peak memory, Rel/Gen/Loc.
  3. Inference latency of the edited model (side memory + router) against the unedited one on
     the same prompts: forward at batch 1 and 16, and ``generate()`` with a KV cache.
  4. Memory growth over a stream of cheap edits (must stay within the stored shards + 50 MB).
  5. Edits per second of a long stream in a cheap configuration, with its Rel and Loc.

Writes ``OUT/bench.json`` and ``OUT/BENCH.md`` (``--out``, default ``runs/bench``). The frozen
model runs in ``--dtype``; the side memory is always fp32.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from repair_pl.checkpoint import write_file_atomic, write_json_atomic  # noqa: E402
from repair_pl.data import EditDataModule  # noqa: E402
from repair_pl.evaluate import evaluate_records  # noqa: E402
from repair_pl.host_memory import rss_mb, side_memory_mb, trim_heap  # noqa: E402

ZSRE = "data/zsre/zsre_edit_1000.json"
TINY_SETTINGS = dict(n_prefixes=2, layer=2, lr=10.0, alpha=1.0, beta=5.0, gamma=3.0, mask_ratio=0.5,
                     norm_constraint=None)
"""Margins scaled to the tiny random model's activation norms (as in the unit tests)."""
LLAMA3_SETTINGS = dict(layer=29, eval_batch_size=32)
"""WISE's published layer for Llama-3-8B (configs/llama3_8b.yaml)."""
# Part 5's default: GRACE, the cheapest method that edits the stream (docs/benchmarks.md); REPAIR's
# 1000-edit stream is --stream '{"method": "repair"}', or the sweep (docs/results.md, long streams).
CHEAP_STREAM = dict(method="grace")


# ---- set-up ------------------------------------------------------------------------------------
def editor_arguments(model: str, method: str = "repair", **options) -> dict:
    """RepairModule arguments for ``method`` on ``model`` with flat ``options`` on top: for the
    embedded SmolLM2 those of configs/zsre.yaml (with the method's overlay); for the tiny random
    model margins scaled to it; for Llama-3 WISE's published layer."""
    from repair_pl.presets import preset

    if model == "smollm2":
        from repair_pl.cli import module_arguments
        from repair_pl.sweep import find_config, method_args

        base = module_arguments(find_config("zsre"), *method_args(method)[1:])
        return preset(method, base=base, **options)
    if model == "tiny-random":
        side_memory = method in ("wise", "repair")
        return preset(method, **{**(TINY_SETTINGS if side_memory else {"layer": 2}), **options})
    if "llama-3" in model.lower():
        return preset(method, **{**LLAMA3_SETTINGS, **options})
    return preset(method, **options)


def load_editor(model: str, device: str = "cpu", dtype: str = "float32", method: str = "repair", **options):
    """A RepairModule on ``device`` whose per-edit fits run there too."""
    from repair_pl.module import RepairModule

    module = RepairModule(model, dtype=dtype, **editor_arguments(model, method, **options))
    module.to(device)
    module.trainer_kwargs = {"accelerator": "gpu" if str(device).startswith("cuda") else "cpu", "devices": 1}
    return module


def release() -> None:
    """Give the memory of dropped modules back (call after ``module = None``) before the next
    part loads one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_records(path: str, n: int) -> list:
    """The first ``n`` records of ``path`` (``demo`` for the bundled set), cycled when it has fewer."""
    data = EditDataModule(path)
    data.setup()
    records = data.records
    return [records[i % len(records)] for i in range(n)]


def device_info(device: str, dtype: str) -> dict:
    """What the numbers were measured on."""
    info = {"device": device, "dtype": dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["cpu"], info["cpu_cores"] = cpu, os.cpu_count()
    info["date"] = time.strftime("%Y-%m-%d")
    try:  # the code measured
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory inside a ``with`` block: CUDA max allocated on a GPU, else the process RSS
    sampled every few milliseconds (RSS has no resettable peak). ``peak_mb``, ``start_mb``."""

    def __init__(self, device: str, interval: float = 0.005):
        self.cuda, self.interval = str(device).startswith("cuda"), interval

    @staticmethod
    def trimmed_rss_mb() -> float | None:
        """RSS after glibc's ``malloc_trim(0)`` hands freed heap pages back to the system: what
        is still in use, not what the allocator keeps cached. None where there is no glibc."""
        return rss_mb() if trim_heap() else None

    def now_mb(self) -> float:
        return torch.cuda.memory_allocated() / 2**20 if self.cuda else rss_mb()

    def __enter__(self):
        self.start_mb = self.peak_mb = self.now_mb()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc):
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, rss_mb())


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


# ---- part 1: Lightning overhead ------------------------------------------------------------------
def plain_edit(module, record, steps: int) -> None:
    """``RepairModule.edit`` for ``method="wise"`` without Lightning: the same prepared batch,
    the same cached lower states, SGD, gradient mask and clamp, ``steps`` steps, and the same
    bookkeeping after the edit (routing threshold)."""
    memory = module.memory
    batch = module.prepare_edit(record)
    start_weight = memory.side.detach().clone()
    memory.mode = "edit"
    memory.invalidate()
    module.train()
    lower = module.lower_states(batch)
    optimizer = torch.optim.SGD([memory.side], lr=memory.lr)
    for _ in range(steps):
        optimizer.zero_grad()
        out = module.edit_losses(batch, lower)
        out["loss"].backward()
        memory.side.grad.mul_(memory.mask)
        optimizer.step()
        if memory.norm_constraint is not None:
            c = memory.norm_constraint
            with torch.no_grad():
                memory.side.copy_(torch.clamp(memory.side, start_weight - c, start_weight + c))
    module.eval()
    memory.mode = "route"
    memory.invalidate()
    module._lower = lower
    memory.record_in_scope(module.trained_score(batch))
    module._lower = None
    memory.current_losses.append(float(out["edit_loss"].detach()))
    module.edit_count += 1


def _edit_state(module) -> dict:
    m = module.memory
    return {"side": m.side.detach().clone(), "min_in_scope": m.min_in_scope, "period_min": m.period_min,
            "current_losses": list(m.current_losses), "edit_count": module.edit_count}


def _restore(module, state: dict) -> None:
    m = module.memory
    with torch.no_grad():
        m.side.copy_(state["side"])
    m.min_in_scope, m.period_min = state["min_in_scope"], state["period_min"]
    m.current_losses, module.edit_count = list(state["current_losses"]), state["edit_count"]
    m.invalidate()


def lightning_overhead(module, records, steps: int, device: str = "cpu") -> dict:
    """Per edit: Lightning ``edit`` then, from the same starting state, the plain loop; the
    two must reach the same weights. The first record warms both paths up and is not timed."""
    module.method, module.hparams.max_steps = "wise", steps
    module.components, module.edit_callbacks = None, []  # WISE: no components, both run exactly ``steps`` steps
    lightning, plain, max_diff = [], [], 0.0
    for i, record in enumerate(records):
        before = _edit_state(module)
        sync(device)
        t0 = time.perf_counter()
        result = module.edit(record)
        sync(device)
        t1 = time.perf_counter()
        if result.steps != steps:
            raise RuntimeError(f"the Lightning edit ran {result.steps} steps, expected {steps}")
        after = _edit_state(module)
        _restore(module, before)
        sync(device)
        t2 = time.perf_counter()
        plain_edit(module, record, steps)
        sync(device)
        t3 = time.perf_counter()
        diff = float((module.memory.side.detach() - after["side"]).abs().max())
        if not torch.allclose(module.memory.side.detach(), after["side"], rtol=1e-4, atol=1e-5):
            raise AssertionError(f"plain loop and Lightning edit disagree on edit {i} (max diff {diff:.3g})")
        max_diff = max(max_diff, diff)
        if i > 0:
            lightning.append(t1 - t0)
            plain.append(t3 - t2)
    l_s, p_s = median(lightning), median(plain)
    return {"edits": len(lightning), "steps": steps, "lightning_s_per_edit": l_s, "plain_s_per_edit": p_s,
            "overhead_s_per_edit": l_s - p_s, "ratio": l_s / p_s, "overhead_pct": 100 * (l_s / p_s - 1),
            "max_weight_diff": max_diff, "target_pct": 10.0}


# ---- part 2: REPAIR vs WISE ------------------------------------------------------------------
def run_stream(module, records, device: str = "cpu", reference=None) -> dict:
    """Edit ``records`` as one stream, then score them; wall time includes REPAIR's batch hooks
    (clustering, merging, re-checks), training seconds only the per-edit fits."""
    hp = module.hparams
    with PeakMemory(device) as peak:
        sync(device)
        t0 = time.perf_counter()
        steps, train_s, n_results, failed = 0, 0.0, 0, {}
        for record, result in module.edit_stream(records, progress=False):
            steps, train_s, n_results = steps + result.steps, train_s + result.seconds, n_results + 1
            failed[id(record)] = not result.success
        sync(device)
        wall = time.perf_counter() - t0
    post = evaluate_records(module.logits_fn(edited=True), module.tokenizer, records, reference=reference,
                            batch_size=hp.eval_batch_size, max_length=hp.max_length, device=module.device)
    n = len(records)
    return {"method": module.method, "n_edits": n, "seconds_per_edit": wall / n, "edits_per_second": n / wall,
            "train_seconds_per_edit": train_s / n, "steps_per_edit": steps / n, "fits": n_results,
            "n_failed": sum(failed.values()), "side_memory_mb": side_memory_mb(module),
            "peak_mb": peak.peak_mb, "peak_growth_mb": peak.peak_mb - peak.start_mb,
            "post": {k: post.means[k] for k in ("rewrite_acc", "rephrase_acc", "locality") if k in post.means}}


def pre_reference(module, records):
    """Locality predictions of the unedited model (the reference of post-edit locality)."""
    hp = module.hparams
    return evaluate_records(module.logits_fn(edited=False), module.tokenizer, records, batch_size=hp.eval_batch_size,
                            max_length=hp.max_length, device=module.device).locality_preds


def repair_vs_wise(model: str, records, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                   methods=("wise", "repair"), **settings) -> dict:
    """Each method on a freshly loaded model, same seed and settings; ratios against the first."""
    import lightning as L

    out, reference = {}, None
    for method in methods:
        L.seed_everything(seed, verbose=False)
        module = load_editor(model, device, dtype, method=method, seed=seed, **settings)
        if reference is None:
            reference = pre_reference(module, records)
        out[method] = run_stream(module, records, device, reference)
        module = None
        release()
    base = out[methods[0]]
    for method in methods[1:]:
        out[method]["seconds_ratio_vs_" + methods[0]] = out[method]["seconds_per_edit"] / base["seconds_per_edit"]
        out[method]["steps_ratio_vs_" + methods[0]] = out[method]["steps_per_edit"] / max(base["steps_per_edit"], 1e-9)
    return out


# ---- part 3: inference latency ------------------------------------------------------------------
def inference_latency(module, prompts: list[str], batch_sizes=(1, 16), repeats: int = 5, gen_prompts: int = 32,
                      gen_tokens: int = 16, gen_batch: int = 16, device: str = "cpu") -> dict:
    """Edited (routed) vs unedited forward passes on the same prompts, alternating per batch so
    both see the same machine load; per repeat the totals, then medians over repeats."""
    if module.memory.epsilon is None:
        raise ValueError("edit the module first: routing is only active after an edit")
    tok = module.tokenizer
    out: dict = {}
    routed = []
    for bs in batch_sizes:
        batches = [tok(prompts[i: i + bs], return_tensors="pt", padding=True).to(module.device)
                   for i in range(0, len(prompts), bs)]
        totals = {True: [], False: []}
        with torch.inference_mode():
            for r in range(repeats + 1):  # the first round warms up
                spent = {True: 0.0, False: 0.0}
                for j, enc in enumerate(batches):
                    for edited in ((True, False) if (j + r) % 2 == 0 else (False, True)):
                        fn = module.logits_fn(edited=edited)
                        sync(device)
                        t0 = time.perf_counter()
                        fn(enc.input_ids, enc.attention_mask, enc.attention_mask)
                        sync(device)
                        spent[edited] += time.perf_counter() - t0
                        if edited and r == 0 and bs == batch_sizes[0]:
                            routed += (module.memory.last_choice >= 0).tolist()
                if r > 0:
                    for k in spent:
                        totals[k].append(spent[k])
        e, u = median(totals[True]), median(totals[False])
        out[f"forward_b{bs}"] = {"edited_ms_per_prompt": 1000 * e / len(prompts),
                                 "unedited_ms_per_prompt": 1000 * u / len(prompts), "ratio": e / u,
                                 "overhead_pct": 100 * (e / u - 1)}
    gen = prompts[:gen_prompts]
    totals = {True: [], False: []}
    for r in range(repeats + 1):
        spent = {True: 0.0, False: 0.0}
        for j in range(0, len(gen), gen_batch):
            for edited in ((True, False) if (j // gen_batch + r) % 2 == 0 else (False, True)):
                sync(device)
                t0 = time.perf_counter()
                module.generate(gen[j: j + gen_batch], max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
                                edited=edited)
                sync(device)
                spent[edited] += time.perf_counter() - t0
        if r > 0:
            for k in spent:
                totals[k].append(spent[k])
    e, u = median(totals[True]), median(totals[False])
    n_tokens = len(gen) * gen_tokens
    out["generate"] = {"edited_ms_per_token": 1000 * e / n_tokens, "unedited_ms_per_token": 1000 * u / n_tokens,
                       "ratio": e / u, "overhead_pct": 100 * (e / u - 1), "batch": gen_batch, "prompts": len(gen),
                       "new_tokens": gen_tokens}
    out["prompts"], out["repeats"] = len(prompts), repeats
    out["routed_share"] = sum(routed) / max(len(routed), 1)
    out["target_pct"] = 5.0
    return out


# ---- part 4: memory growth ------------------------------------------------------------------------
def memory_growth(module, records, device: str = "cpu", warmup: int = 5, every: int = 50) -> dict:
    """Memory kept between edits over a stream, after ``warmup`` edits: what a growing history of
    past edits would show. Growth = memory after the last edit - memory after the warm-up (both
    taken between edits, when an edit's activations are freed); it must stay within the stored
    shards + 50 MB. The peaks (during the warm-up and after it) are reported too: a peak also
    holds one edit's activations, which depend on that record's length, not on the history."""
    pm, warmup = PeakMemory(device), min(warmup, len(records) // 2)
    with PeakMemory(device) as warm:
        for record in records[:warmup]:
            module.edit(record)

    # Judged: CUDA allocated memory on a GPU; on a CPU the RSS after malloc_trim (memory in use).
    # The raw RSS is kept beside it.
    def sample(i: int) -> None:
        rss.append((i, rss_mb()))
        judged.append((i, pm.now_mb() if pm.cuda else pm.trimmed_rss_mb()))

    rss, judged, shards_max = [], [], 0.0
    sample(warmup)
    with PeakMemory(device) as rest:
        for i, record in enumerate(records[warmup:], start=warmup + 1):
            module.edit(record)
            shards_max = max(shards_max, side_memory_mb(module)["shards"])
            if i % every == 0 or i == len(records):
                sample(i)
    trimmed = not pm.cuda and judged[0][1] is not None
    if not pm.cuda and not trimmed:  # no glibc: the raw RSS is all there is
        judged = rss
    growth = judged[-1][1] - judged[0][1]
    return {"edits": len(records), "max_steps": module.hparams.max_steps, "warmup_peak_mb": warm.peak_mb,
            "peak_mb": rest.peak_mb, "after_warmup_mb": judged[0][1], "end_mb": judged[-1][1], "growth_mb": growth,
            "stored_shards_mb_max": shards_max, "limit_mb": shards_max + 50.0, "ok": growth <= shards_max + 50.0,
            "series_mb": judged, "rss_series_mb": rss, "raw_rss_growth_mb": rss[-1][1] - rss[0][1],
            "measure": "cuda allocated" if pm.cuda else ("process RSS after malloc_trim" if trimmed else "process RSS")}


# ---- the report --------------------------------------------------------------------------------------
def _md_overhead(r: dict) -> list[str]:
    return ["## 1. Lightning overhead per edit", "",
            "| Lightning edit (s) | plain loop (s) | ratio | overhead | target | steps | edits | max weight diff |",
            "|---|---|---|---|---|---|---|---|",
            f"| {r['lightning_s_per_edit']:.3f} | {r['plain_s_per_edit']:.3f} | {r['ratio']:.3f} | "
            f"{r['overhead_pct']:+.1f}% | <= 10% | {r['steps']} | {r['edits']} | {r['max_weight_diff']:.1e} |"]


def _md_streams(title: str, rows: dict, settings: dict) -> list[str]:
    first = next(iter(rows.values()))
    lines = [title, "", f"{first['n_edits']} ZsRE edits; settings: `{json.dumps(settings)}`", "",
             "| method | s/edit | ratio | edits/s | train s/edit | steps/edit | failed | Rel | Gen | Loc | "
             "side MB | shards MB | peak MB |", "|---|" + "---|" * 12]
    for name, r in rows.items():
        p, nan = r["post"], float("nan")
        lines.append(f"| {name} | {r['seconds_per_edit']:.3f} | {r['seconds_per_edit'] / first['seconds_per_edit']:.2f} | "
                     f"{r['edits_per_second']:.2f} | {r['train_seconds_per_edit']:.3f} | {r['steps_per_edit']:.1f} | "
                     f"{r['n_failed']} | {p.get('rewrite_acc', nan):.3f} | {p.get('rephrase_acc', nan):.3f} | "
                     f"{p.get('locality', nan):.3f} | {r['side_memory_mb']['side']:.2f} | "
                     f"{r['side_memory_mb']['shards']:.2f} | {r['peak_mb']:.0f} |")
    return lines


def _md_latency(r: dict) -> list[str]:
    lines = ["## 3. Inference latency, edited (routed) vs unedited", "",
             f"{r['prompts']} prompts, median of {r['repeats']} repeats; share routed to the side memory: "
             f"{r['routed_share']:.2f}", "", "| pass | edited | unedited | ratio | overhead | target |",
             "|---|---|---|---|---|---|"]
    for k, v in r.items():
        if k.startswith("forward_b"):
            lines.append(f"| forward, batch {k[9:]} | {v['edited_ms_per_prompt']:.2f} ms/prompt | "
                         f"{v['unedited_ms_per_prompt']:.2f} ms/prompt | {v['ratio']:.3f} | {v['overhead_pct']:+.1f}% | <= 5% |")
    g = r["generate"]
    return lines + [f"| generate (KV cache, batch {g['batch']}, {g['prompts']} prompts x {g['new_tokens']} tokens) | "
                    f"{g['edited_ms_per_token']:.2f} ms/token | {g['unedited_ms_per_token']:.2f} ms/token | "
                    f"{g['ratio']:.3f} | {g['overhead_pct']:+.1f}% | <= 5% |"]


def _md_memory(r: dict) -> list[str]:
    return ["## 4. Memory over a stream of edits", "", f"{r['edits']} edits of {r['max_steps']} steps; {r['measure']}", "",
            "| after warm-up | after the last edit | growth | stored shards (max) | limit | within "
            "| peak during warm-up | peak after |", "|---|---|---|---|---|---|---|---|",
            f"| {r['after_warmup_mb']:.0f} MB | {r['end_mb']:.0f} MB | {r['growth_mb']:+.1f} MB | "
            f"{r['stored_shards_mb_max']:.1f} MB | {r['limit_mb']:.1f} MB | {'yes' if r['ok'] else 'NO'} | "
            f"{r['warmup_peak_mb']:.0f} MB | {r['peak_mb']:.0f} MB |"] + (
        ["", f"{'Host' if r['measure'] == 'cuda allocated' else 'Raw'} RSS between edits (MB): "
         + ", ".join(f"{mb:.0f}" for _, mb in r["rss_series_mb"]) + f" (growth {r['raw_rss_growth_mb']:+.1f} MB)"]
        if r.get("rss_series_mb") and r["measure"] != "process RSS" else [])


def markdown(result: dict) -> str:
    """The BENCH.md tables, parts in order."""
    d = result["device"]
    where = d.get("gpu") or f"{d['cpu']} ({d['cpu_cores']} cores, {d['threads']} threads)"
    lines = [f"# Speed bench: {result['model']}", "",
             f"{where}; torch {d['torch']}; frozen weights {d['dtype']}, side memory float32; "
             f"{d.get('date')}, commit {d.get('commit')}; command: `{result['command']}`", ""]
    parts = {"1": _md_overhead,
             "2": lambda r: _md_streams("## 2. REPAIR vs WISE (and cost analysis)", r["methods"], r["settings"]),
             "3": _md_latency, "4": _md_memory,
             "5": lambda r: _md_streams("## 5. Long stream, cheap configuration", {r["run"]["method"]: r["run"]},
                                        r["settings"]) + ["", f"Rel >= 0.8 and Loc >= 0.98: {'yes' if r['ok'] else 'NO'}"] + (
                 [f"Cut to {r['run']['n_edits']} of the {r['n_requested']} edits asked for, to fit --stream-budget."]
                 if r.get("n_requested", r["run"]["n_edits"]) > r["run"]["n_edits"] else [])}
    for key, render in parts.items():
        if key in result:
            lines += render(result[key]) + [""]
    return "\n".join(lines) + "\n"


QUICK = dict(overhead_edits=4, overhead_steps=20, T=10, prompts=64, repeats=3, gen_prompts=16, gen_tokens=8,
             mem_edits=60, stream_n=20)
FULL = dict(overhead_edits=11, overhead_steps=70, T=50, prompts=200, repeats=5, gen_prompts=64, gen_tokens=16,
            mem_edits=500, stream_n=1000)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sizes default to the quick run; --full sets the documented full sizes "
                                       "(explicit flags still win).")
    p.add_argument("--parts", nargs="+", default=["1", "2", "3", "4", "5"], choices=list("12345"))
    p.add_argument("--model", default="smollm2", help="smollm2, tiny-random, or a local Llama folder "
                   "(e.g. Meta-Llama-3-8B-Instruct: its WISE layer 29 is used)")
    p.add_argument("--data", default=ZSRE, help="edit records (ZsRE); 'demo' for the bundled set")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="of the frozen model; the side memory is fp32")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    p.add_argument("--full", action="store_true", help="the documented full sizes")
    p.add_argument("--overhead-edits", type=int, help="part 1: timed edits (plus one warm-up)")
    p.add_argument("--overhead-steps", type=int, help="part 1: fixed steps per edit")
    p.add_argument("-T", "--T", type=int, help="part 2: records per method")
    p.add_argument("--max-steps", type=int, default=70, help="parts 2 and 3: step budget of an edit")
    p.add_argument("--prompts", type=int, help="part 3: prompts timed")
    p.add_argument("--repeats", type=int, help="part 3: repeats (median)")
    p.add_argument("--gen-prompts", type=int, help="part 3: prompts generated from")
    p.add_argument("--gen-tokens", type=int, help="part 3: new tokens per prompt")
    p.add_argument("--mem-edits", type=int, help="part 4: edits in the stream")
    p.add_argument("--mem-steps", type=int, default=3, help="part 4: steps per edit (cheap)")
    p.add_argument("--save-freq", type=int, default=50, help="part 4: store a shard every N edits")
    p.add_argument("--merge-freq", type=int, default=250, help="part 4: merge the shards every N edits")
    p.add_argument("-n", "--n", dest="stream_n", type=int, help="part 5: edits in the stream")
    p.add_argument("--stream", default=json.dumps(CHEAP_STREAM), help="part 5: RepairModule settings (JSON)")
    p.add_argument("--stream-budget", type=float, help="part 5: seconds of editing to aim at; with part 2 "
                   "measured first, the stream is cut to the edits that fit (at part 2's REPAIR s/edit)")
    args = p.parse_args(argv)
    for key, value in (FULL if args.full else QUICK).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev, dtype, model = args.device, args.dtype, args.model
    result: dict = {"model": model, "device": device_info(dev, dtype),
                    "command": "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    n_records = max(args.overhead_edits + 1, args.T, args.prompts, args.mem_edits, args.stream_n)
    records = read_records(args.data, n_records)

    def show(part: str) -> None:  # print a part as soon as it is measured and save what is done
        print(_section(result, part), flush=True)
        write_json_atomic(out_dir / "bench.json", result, indent=1)
        write_file_atomic(out_dir / "BENCH.md", markdown(result))

    if "1" in args.parts:
        module = load_editor(model, dev, dtype, method="wise", seed=args.seed)
        result["1"] = lightning_overhead(module, records[: args.overhead_edits + 1], args.overhead_steps, dev)
        module = None
        release()
        show("1")
    if "2" in args.parts:
        settings = {"max_steps": args.max_steps}
        result["2"] = {"settings": settings, "methods": repair_vs_wise(model, records[: args.T], dev, dtype, args.seed,
                                                                      **settings)}
        show("2")
    if "3" in args.parts:
        module = load_editor(model, dev, dtype, method="wise", seed=args.seed, max_steps=args.max_steps)
        for record in records[:5]:
            module.edit(record)
        prompts = [r.prompt for r in records[: args.prompts]]
        result["3"] = inference_latency(module, prompts, repeats=args.repeats, gen_prompts=args.gen_prompts,
                                        gen_tokens=args.gen_tokens, device=dev)
        module = None
        release()
        show("3")
    if "4" in args.parts:
        module = load_editor(model, dev, dtype, method="wise", seed=args.seed, max_steps=args.mem_steps,
                             save_freq=args.save_freq,
                             merge_freq=args.merge_freq)
        result["4"] = memory_growth(module, records[: args.mem_edits], dev)
        module = None
        release()
        show("4")
    if "5" in args.parts:
        import lightning as L

        settings = json.loads(args.stream)
        L.seed_everything(args.seed, verbose=False)
        module = load_editor(model, dev, dtype, seed=args.seed, **settings)
        stream = records[: stream_length(args.stream_n, args.stream_budget, result)]
        run = run_stream(module, stream, dev, pre_reference(module, stream))
        result["5"] = {"settings": settings, "run": run, "n_requested": args.stream_n,
                       "ok": run["post"].get("rewrite_acc", 0) >= 0.8 and run["post"].get("locality", 0) >= 0.98}
        module = None
        release()
        show("5")
    print(f"bench: {out_dir / 'BENCH.md'}", flush=True)
    return result


def stream_length(n: int, budget: float | None, result: dict) -> int:
    """Part 5's number of edits: ``n``, or, with a time budget and part 2's REPAIR measured, the
    multiple of 10 edits that fit the budget at that speed (with a 30% margin), at least 10."""
    repair = result.get("2", {}).get("methods", {}).get("repair")
    if budget is None or repair is None:
        return n
    fits = int(budget / (1.3 * repair["seconds_per_edit"])) // 10 * 10
    return max(10, min(n, fits))


def _section(result: dict, part: str) -> str:
    """The markdown of one part (printed as soon as it is measured)."""
    text = markdown({k: v for k, v in result.items() if not k.isdigit() or k == part})
    return text.split("\n\n", 2)[-1]


if __name__ == "__main__":
    main()
