"""``EditCLI``: LightningCLI whose ``fit`` runs the lifelong editing protocol.

``python scripts/edit.py fit --config configs/zsre.yaml`` builds ``RepairModule`` (``model:``),
``EditDataModule`` (``data:``) and a Trainer (``trainer:``) from the YAML, then edits the data
stream T records at a time (``--T``), each edit a short ``fit`` of its own. The Trainer section
supplies the output folder (``default_root_dir``), the logger and the accelerator.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from repair_pl.checkpoint import write_file_atomic
from repair_pl.data import EditDataModule
from repair_pl.generation import GenerationCheck
from repair_pl.host_memory import bound_kernel_caches
from repair_pl.lifelong import check_run_options, run_lifelong
from repair_pl.module import RepairModule
from repair_pl.tracking import default_offline, finish_run, log_summary_table, sweep_run_dir


class EditCLI(LightningCLI):
    """The project's command line (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_callback", None)  # we save the config next to the results
        default_offline()  # a WandbLogger in the config runs offline unless WANDB_MODE says otherwise
        bound_kernel_caches()  # a bf16 model on a CPU would otherwise grow with the edit stream
        super().__init__(RepairModule, EditDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--T", type=int | None, default=None,
                            help="edits per lifelong chunk: edit T records, evaluate them, reset, repeat (null: all)")
        parser.add_argument("--checkpoint_every", type=int | None, default=10,
                            help="checkpoint the run into DIR/checkpoint every N edits; rerunning the same command "
                                 "resumes from it (null: no checkpoints)")
        parser.add_argument("--pre_eval_cache", type=str | None, default=None,
                            help="folder for the unedited model's evaluation: reused when the model, evaluation "
                                 "settings and records match (a sweep shares one across methods; one process only)")
        parser.add_argument("--generation_examples", type=int, default=0,
                            help="after the run, print what the model generates before and after editing for this "
                                 "many edited prompts (and one unrelated one)")
        parser.add_argument("--generation", type=bool, default=False,
                            help="also generate each answer greedily (plain and with the chat template) and score "
                                 "exact match and unchanged locality answers (docs/evaluation.md)")

    def before_instantiate_classes(self) -> None:
        """Check the run's own options before the model is loaded."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        check_run_options(config.get("T"), config.get("checkpoint_every"))

    def fit(self, model: RepairModule, datamodule: EditDataModule, **_) -> dict:
        """Run the lifelong protocol instead of a single Trainer.fit."""
        config = self.config[self.subcommand]
        out = sweep_run_dir(Path(self.trainer.default_root_dir))
        out.mkdir(parents=True, exist_ok=True)
        # the parts as built (a preset fills what the config left null): the values really used
        config["model"]["method"] = model.method
        config["model"]["memory"], config["model"]["components"] = model.hparams.memory, model.hparams.components
        # the subcommand's own section: the file is a valid `edit.py fit --config`
        parser = self._parser(self.subcommand)
        write_file_atomic(out / "config.yaml", parser.dump(config, skip_none=False, skip_check=True))
        if self.trainer.logger is not None:
            self.trainer.logger.log_hyperparams(flat_config(config))
        trainer_cfg = config.get("trainer", {})
        progress = trainer_cfg.get("enable_progress_bar") is not False  # Lightning's default: on
        model.trainer_kwargs = {"accelerator": trainer_cfg.get("accelerator") or "auto", "devices": 1}
        if self.trainer.num_devices * self.trainer.num_nodes > 1:
            return self._fit_ddp(model, datamodule, config, out)
        if model.hparams.device_map is None:  # else the device_map has placed the model over its devices
            model.to(self.trainer.strategy.root_device)
        datamodule.setup("fit")
        summary = run_lifelong(model, datamodule.records, out, T=config.get("T"), dataset=datamodule.dataset_name,
                               logger=self.trainer.logger or None, checkpoint_every=config.get("checkpoint_every"),
                               skipped=datamodule.skipped, pre_eval_cache=config.get("pre_eval_cache"),
                               progress=progress,
                               generation=GenerationCheck() if config.get("generation") else None)
        if config.get("generation_examples"):
            print_generation_examples(model, datamodule.records, config["generation_examples"], out)
        log_summary_table(self.trainer.logger, summary)
        finish_run()  # one W&B run per lifelong run, also when a sweep runs several in one process
        print(f"summary: {out / 'summary.json'}", flush=True)
        return summary

    def _fit_ddp(self, model: RepairModule, datamodule: EditDataModule, config, out: Path) -> dict:
        """``trainer.devices`` > 1: one process per device (Lightning Fabric's ddp), each editing
        its share of the lifelong chunks; metrics synced (:mod:`repair_pl.distributed`)."""
        from repair_pl.distributed import launch, run_lifelong_sharded, shutdown

        if model.hparams.device_map is not None:
            raise ValueError("model.device_map spreads one model over several GPUs; it cannot be combined with "
                             "trainer.devices > 1 (DDP runs one whole model per device)")
        trainer_cfg = config.get("trainer", {})
        fabric = launch(trainer_cfg.get("accelerator") or "auto", trainer_cfg.get("devices"),
                        trainer_cfg.get("num_nodes") or 1)
        model.to(fabric.device)
        datamodule.setup("fit")
        summary = run_lifelong_sharded(model, datamodule.records, out, T=config.get("T"),
                                       dataset=datamodule.dataset_name, checkpoint_every=config.get("checkpoint_every"),
                                       progress=trainer_cfg.get("enable_progress_bar") is not False,
                                       generation=GenerationCheck() if config.get("generation") else None)
        shutdown()
        if fabric.global_rank == 0:
            print(f"summary: {out / 'summary.json'}", flush=True)
        return summary


def module_arguments(*configs: str | Path, overrides: dict | None = None) -> dict:
    """``RepairModule`` keyword arguments from the ``model:`` sections of config files, merged in
    order as ``edit.py fit --config A --config B`` merges them (``overrides``: more of the same,
    e.g. ``{"max_steps": 5}``), with the memory and components built. ``model`` (the name) is left
    out, for code that loads the model itself."""
    import yaml
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RepairModule, "model", instantiate=False, skip={"tokenizer"})
    cfg = parser.get_defaults()
    sections = [(yaml.safe_load(Path(c).read_text()) or {}).get("model") or {} for c in configs]
    for section in sections:  # a run's saved config.yaml lists the tokenizer (null): loaded with the model
        section.pop("tokenizer", None)
    for section in [*sections, overrides or {}]:
        cfg = parser.parse_object({"model": section}, cfg_base=cfg)
    kwargs = parser.instantiate(cfg).model.as_dict()
    kwargs.pop("model", None)
    return kwargs


def flat_config(config) -> dict:
    """The run's resolved configuration as flat ``a.b.c`` keys (what loggers group runs by)."""
    def flatten(value, prefix=""):
        if hasattr(value, "as_dict"):
            value = value.as_dict()
        if isinstance(value, dict):
            for key, item in value.items():
                yield from flatten(item, f"{prefix}{key}.")
        else:
            yield prefix[:-1], value

    return {k: v for k, v in flatten(config) if not k.startswith(("trainer.logger", "config"))}


def print_generation_examples(module: RepairModule, records: list, n: int, out: Path) -> None:
    """Print what the model generates for ``n`` edited prompts (the last ``n`` records, which the
    final memory holds) and one unrelated question, before and after editing; also written to
    ``out/generations.md``. Plain prompts, as the edits were trained (the evaluation's generated
    columns also score the chat template)."""
    picked = list(records[-n:])
    questions = [r.prompt for r in picked] + [p for r in picked[:1] for p, _ in r.locality[:1]]
    before = module.generate(questions, max_new_tokens=16, edited=False)
    after = module.generate(questions, max_new_tokens=16, edited=True)
    lines = ["| question | edit target | before | after |", "|---|---|---|---|"]
    for i, question in enumerate(questions):
        target = picked[i].target if i < len(picked) else "(unrelated: should not change)"
        cells = [question, target, before[i].strip().replace("\n", " "), after[i].strip().replace("\n", " ")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    write_file_atomic(out / "generations.md", text)
    print("\ngenerated answers, before -> after editing (greedy, plain prompts):\n" + text, flush=True)


def main(args=None) -> None:
    """Entry point of ``repair-pl`` and ``scripts/edit.py``: known input errors end with one
    clear line (set ``REPAIR_PL_DEBUG=1`` for the traceback)."""
    import os
    import sys

    from repair_pl.data import EditDataError
    from repair_pl.eren import EncoderError, NotebookError, ReaderError
    from repair_pl.eren.run import is_eren_invocation
    from repair_pl.eren.run import main as eren_main
    from repair_pl.models import ModelLoadError

    argv = sys.argv[1:] if args is None else args
    try:
        # method: eren edits no weights, so it has no RepairModule to build: its own runner
        if isinstance(argv, list) and is_eren_invocation(argv):
            eren_main(argv)
        else:
            EditCLI(args=args, parser_kwargs={"default_env": False})
    except (EditDataError, ModelLoadError, ValueError, FileNotFoundError,
            EncoderError, NotebookError, ReaderError) as err:
        if os.environ.get("REPAIR_PL_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
