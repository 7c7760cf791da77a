"""PNG plots of a sweep (:mod:`repair_pl.sweep`): metrics and seconds per edit vs number of edits T
per method, and locality vs T per dataset. Needs matplotlib (extra ``plots``); without it no plot is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

METRICS = (("rewrite_acc", "Rel"), ("rephrase_acc", "Gen"), ("locality", "Loc"), ("ood_acc", "OOD"),
           ("rewrite_gen_em", "generated Rel"), ("rephrase_gen_em", "generated Gen"),
           ("rewrite_ppl", "target PPL (lower is better)"), ("seconds_per_edit", "seconds per edit"))
UNBOUNDED = ("rewrite_ppl", "seconds_per_edit")  # not shares in [0, 1]


def _value(row: dict, key: str):
    """A run's post-edit mean of ``key``, or its seconds per edit (a key of the summary itself)."""
    return row.get(key) if key == "seconds_per_edit" else row["post"].get(key)


def _line(ax, rows: Sequence[dict], key: str) -> None:
    """One line per run name: post-edit ``key`` against T."""
    for name in dict.fromkeys(r["run"] for r in rows):
        points = sorted((r["T"], _value(r, key)) for r in rows if r["run"] == name and _value(r, key) is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ts = sorted({r["T"] for r in rows})
    if len(ts) > 1 and ts[-1] / ts[0] >= 10:
        ax.set_xscale("log")
    ax.set_xticks(ts, [str(t) for t in ts])
    ax.minorticks_off()
    ax.set_xlabel("T (edits)")
    if key in UNBOUNDED:
        values = [_value(r, key) for r in rows if _value(r, key) is not None]
        if values and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_yscale("log")  # e.g. perplexities of edited and unedited targets differ by orders of magnitude
    else:
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def _legend(fig, axes) -> None:
    """One legend for the figure with every method of any subplot."""
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="outside right")


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (a rerun of the sweep rewrites them)."""
    import io

    from repair_pl.checkpoint import write_file_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_file_atomic(path, buffer.getvalue())
    return path


def plot_sweep(rows: Sequence[dict], out: Path) -> list[Path]:
    """Write ``OUT/<dataset>_metrics_vs_T.png`` per dataset and ``OUT/locality_vs_T.png``;
    returns the files written (none without matplotlib or rows)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ImportError:
        return []
    out, written = Path(out), []
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for dataset in datasets:
        group = [r for r in rows if r["dataset"] == dataset]
        keys = [(k, label) for k, label in METRICS if any(_value(r, k) is not None for r in group)]
        fig = Figure(figsize=(3.4 * len(keys), 3.2), layout="constrained")
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        for ax, (key, label) in zip(axes, keys):
            _line(ax, group, key)
            ax.set_title(label)
        _legend(fig, axes)
        fig.suptitle(f"{dataset}: post-edit metrics vs number of edits")
        written.append(_save(fig, out / f"{dataset}_metrics_vs_T.png"))
    if datasets:
        fig = Figure(figsize=(3.4 * len(datasets), 3.2), layout="constrained")
        axes = fig.subplots(1, len(datasets), squeeze=False)[0]
        for ax, dataset in zip(axes, datasets):
            _line(ax, [r for r in rows if r["dataset"] == dataset], "locality")
            ax.set_title(dataset)
        axes[0].set_ylabel("locality")
        _legend(fig, axes)
        fig.suptitle("Locality vs number of edits")
        written.append(_save(fig, out / "locality_vs_T.png"))
    return written
