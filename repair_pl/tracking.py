"""Experiment tracking around the lifelong runs: W&B offline by default, the final metrics as
a table, and one W&B run per lifelong run.

Any Lightning logger works (``trainer.logger``); these helpers only add what W&B needs and do
nothing for other loggers or when wandb is not installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TABLE_KEYS = ("rewrite_acc", "rephrase_acc", "locality", "ood_acc", "rewrite_ppl", "rewrite_em",
              "rewrite_gen_em", "rephrase_gen_em", "locality_gen",  # with generation on (docs/evaluation.md)
              "rewrite_gen_em_chat", "rephrase_gen_em_chat", "locality_gen_chat")


def default_offline() -> None:
    """W&B runs offline unless the user chose otherwise (``WANDB_MODE``) or a sweep agent started
    the run: no account needed; ``wandb sync DIR/wandb/offline-run-*`` uploads a run later."""
    if "WANDB_SWEEP_ID" in os.environ:  # started by `wandb agent`: the sweep needs the run online
        return
    os.environ.setdefault("WANDB_MODE", "offline")


def sweep_run_dir(root: Path) -> Path:
    """``root/<sweep id>/<run id>`` for a run started by ``wandb agent`` (several agents on one
    machine must not write into one folder), else ``root``."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return root / sweep / run if sweep and run else root


def is_wandb(logger) -> bool:
    """Whether ``logger`` is Lightning's ``WandbLogger`` (without importing wandb)."""
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def log_summary_table(logger, summary: dict) -> None:
    """Log the final metrics as a table (one row per stage: pre, post) to a ``WandbLogger``."""
    if not is_wandb(logger):
        return
    keys = [k for k in TABLE_KEYS if k in summary["post"]]
    columns = ["method", "dataset", "T", "stage", *keys, "steps_per_edit", "seconds_per_edit", "n_failed"]
    rows = [[summary["method"], summary["dataset"], summary["T"], stage, *(summary[stage].get(k) for k in keys),
             summary["steps_per_edit"], summary["seconds_per_edit"], summary["n_failed"]]
            for stage in ("pre", "post")]
    logger.log_table("summary", columns=columns, data=rows)


def finish_run(failed: bool = False) -> None:
    """End the current W&B run, if any, so that the next lifelong run in this process (a sweep)
    starts its own instead of appending to this one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def read_offline_run(run_dir) -> dict:
    """Read back an offline W&B run folder (``.../wandb/offline-run-*``) without syncing it:
    ``{"run": {"id", "project", "group", "name"}, "history": [step dicts], "summary": {...}}``.

    The ``run-*.wandb`` file is a LevelDB-style log of W&B's own protobuf ``Record`` messages
    (wandb >= 0.19 no longer ships a Python reader for it).
    """
    import json
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    out: dict = {"run": {}, "history": [], "summary": {}}
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):  # FIRST/MIDDLE parts of a record spanning blocks
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(buf)
        buf = b""
        which = record.WhichOneof("record_type")
        if which == "run":
            r = record.run
            out["run"] = {"id": r.run_id, "project": r.project, "group": r.run_group, "name": r.display_name}
        elif which == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif which == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.summary.update})
    return out
