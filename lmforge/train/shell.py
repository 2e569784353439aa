"""The one training shell: setup, resume, reporting and checkpointing around the one loop.

A training method is a builder, `build(ctx, <its own options>) -> Method`: its model, batches, loss and
how it saves. `@training_verb` turns it into the verb users call (`lmforge.pretrain(...)`, `lmforge
pretrain ...`): the builder's options plus every field of `TrainOptions` as keyword arguments (`--lr`,
`--max-steps`, ...), each documented once, with the method's own defaults. Around the loop, `run`
  - joins the process group under torchrun, refuses an out directory that holds anything, removes the
    temporary files of a killed save, seeds;
  - on `--resume`, takes the run's own options and settings from its train_state.pt, the stopping limits
    anew, and refuses by name any other option given a new value (silently ignoring it would mislead);
  - builds the method, prints what trains on what, trains, and says what stopped it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docstring_parser
import torch
from torch import nn

from lmforge.checkpoint import SHARDED, check_out_dir, load_train_state
from lmforge.errors import CheckpointError, ConfigError, Interrupted
from lmforge.io import remove_stale_temps
from lmforge.options import given as command_line
from lmforge.train.distributed import Dist, adapt_batch, init_distributed, shutdown
from lmforge.train.loop import Batches, LossFn, TrainConfig, train
from lmforge.train.plan import check_run

# What a resumed run may be given anew: where it stops, and how this process runs and reports it.
ANEW = ("max_steps", "max_tokens", "max_minutes", "epochs", "logger", "resume", "device", "progress",
        "activation_checkpointing", "cpu_offload", "memory_limit")
LIMITS = ANEW[:4]


@dataclass
class TrainOptions(TrainConfig):
    """The options of every training verb besides the loop's settings.

    Args:
        out: Run directory; created, or refused if it holds anything.
        resume: Continue a stopped run exactly where it left off; its options and data come from it, and only
            max_steps / max_tokens / max_minutes / epochs may be given anew.
        device: "cpu", "cuda", "cuda:1", ...; default CUDA when present.
        progress: Show the progress line.
    """

    out: Path = Path("runs/train")
    resume: Path | None = None
    device: str | None = None
    progress: bool = True

    def config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})


@dataclass(frozen=True)
class Context:
    """What a method is built with: the process group, the run's settings, and the run it resumes (whose
    weights the model must come back with)."""

    dist: Dist
    cfg: TrainConfig
    resume: Path | None = None


Saver = Callable[[Path, dict[str, Any] | None, int], None]  # (out, train_state, step): writes the run's files


@dataclass
class Method:
    """A training method as the shell runs it: the model, its batches and loss, and how it saves itself."""

    model: nn.Module
    loader: Batches
    loss: LossFn  # (model, x, y) -> (summed loss, how many targets it sums)
    save: Saver
    val_loader: Batches | None = None
    summary: str = ""  # printed before training: what trains, on what


Builder = Callable[..., Method]


def training_verb(verb: str, *, default_epochs: float | None = 3, **defaults: Any) -> Callable[[Builder], Callable]:
    """`build(ctx, <options>) -> Method` becomes the verb `(<options>, out, *, <TrainOptions>) -> Path`.

    `defaults` replace TrainOptions' own for this verb (its learning rate, schedule, out directory, ...).
    With no step, token, time or epoch limit the run trains `default_epochs` (None: a limit is required).
    """
    unknown = set(defaults) - {f.name for f in dataclasses.fields(TrainOptions)}
    if unknown:
        raise TypeError(f"training_verb({verb!r}): no training options {sorted(unknown)}")

    def decorate(build: Builder) -> Callable:
        hints = typing.get_type_hints(build)
        own = [p.replace(annotation=hints[p.name]) for p in list(inspect.signature(build).parameters.values())[1:]]
        shared = _shared_parameters(defaults)
        if clash := {p.name for p in own} & {p.name for p in shared}:
            raise TypeError(f"{build.__name__}: {sorted(clash)} are training options every verb already has")
        positional = [p for p in own if p.kind is p.POSITIONAL_OR_KEYWORD]
        keyword = [p for p in own if p.kind is p.KEYWORD_ONLY]
        signature = inspect.Signature([*positional, shared[0], *keyword, *shared[1:]], return_annotation=Path)
        paths = {p.name for p in [*own, *shared] if Path in (p.annotation, *typing.get_args(p.annotation))}

        def verb_function(*args: Any, **kwargs: Any) -> Path:
            bound = signature.bind(*args, **kwargs)
            written = command_line()  # an option given its default value (`--resume runs/a --lr 3e-4`) counts
            explicit = set(bound.arguments) if written is None else written  # Python: the keywords passed
            bound.apply_defaults()
            values = bound.arguments
            # Given: named explicitly, or a value other than the default (from a --config file, say).
            given = {k: v for k, v in values.items()
                     if k in explicit or not _same(v, signature.parameters[k].default, k in paths)}
            options = {p.name: values[p.name] for p in own}
            settings = {p.name: values[p.name] for p in shared}
            state = None
            if settings["resume"] is not None:
                state, options, settings = _resumed(verb, settings, given, paths)
            train_options = TrainOptions(**settings)
            if not train_options.limited:
                if default_epochs is None:
                    raise ConfigError("set at least one of max_steps, max_tokens, max_minutes or epochs")
                train_options.epochs = default_epochs
            saved = {k: str(Path(v).resolve()) if k in paths and v is not None else v for k, v in options.items()}
            return run(functools.partial(build, **options), train_options, verb=verb, options=saved, state=state)

        verb_function.__signature__ = signature  # what jsonargparse and help() read
        verb_function.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        verb_function.__annotations__["return"] = Path
        verb_function.__name__, verb_function.__qualname__ = build.__name__, build.__qualname__
        verb_function.__module__ = build.__module__
        verb_function.__doc__ = _with_shared_docs(inspect.getdoc(build) or "", [p.name for p in shared])
        return verb_function

    return decorate


def _shared_parameters(defaults: dict[str, Any]) -> list[inspect.Parameter]:
    """TrainOptions' fields as keyword-only parameters, `out` first (it stays positional after the method's)."""
    hints = typing.get_type_hints(TrainOptions)
    fields = sorted(dataclasses.fields(TrainOptions), key=lambda f: f.name != "out")
    return [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name == "out"
                              else inspect.Parameter.KEYWORD_ONLY,
                              default=defaults.get(f.name, f.default), annotation=hints[f.name]) for f in fields]


@functools.cache
def _option_docs() -> dict[str, str]:
    docs = {}
    for cls in (TrainConfig, TrainOptions):
        docs.update({p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__).params})
    return docs


def _with_shared_docs(doc: str, names: list[str]) -> str:
    """The method's docstring with an Args line per shared option appended to its own Args."""
    docs = _option_docs()
    lines = "".join(f"\n    {name}: " + docs[name].replace("\n", "\n        ") for name in names)
    head, returns, tail = doc.partition("\n\nReturns:")
    if "\nArgs:" not in head:
        head += "\n\nArgs:"
    return head + lines + returns + tail


def _same(a: Any, b: Any, path: bool) -> bool:
    if path and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _resumed(verb: str, settings: dict[str, Any], given: dict[str, Any], paths: set[str]
             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(train state, the run's own options, its settings with the limits given anew) of the run to resume."""
    ckpt = Path(settings["resume"])
    if "out" in given and not _same(given["out"], ckpt, True):
        raise ConfigError(f"--out {given['out']} with --resume {ckpt}: a resumed run continues in its own "
                          f"directory; drop --out, or start a new run in {given['out']} without --resume")
    state = load_train_state(ckpt)
    run_info = state.get("run", {})
    if run_info.get("verb") != verb:
        raise CheckpointError(f"{ckpt}: was started by `{run_info.get('verb', '?')}`, not `{verb}`; resume it "
                              "with the verb that started it")
    options, saved = run_info["options"], state["train_config"]
    for name, value in given.items():
        if name in ANEW or name == "out":
            continue
        before = options[name] if name in options else saved.get(name)
        if not _same(value, before, name in paths):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {value}: {ckpt} was started with {before!r}, and a resumed run keeps its "
                              f"settings; drop {flag} (only {', '.join(LIMITS)} may be given anew), or start a "
                              "new run")
    resumed = {**saved, **{k: v for k, v in given.items() if k in ANEW}, "out": ckpt, "resume": ckpt,
               "device": settings["device"], "progress": settings["progress"]}
    if saved["lr_decay_steps"] is None and any(resumed[k] != saved[k] for k in LIMITS):
        resumed["lr_decay_steps"] = state.get("decay_steps")  # extending a run keeps its schedule
    changed = [f"--{k.replace('_', '-')} {resumed[k]} (was {saved.get(k)!r})" for k in LIMITS
               if k in given and resumed[k] != saved.get(k)]
    if changed:  # applied, and said so: an option given with --resume is never silently dropped
        print(f"resuming {ckpt} with {', '.join(changed)}", file=sys.stderr, flush=True)
    return state, options, resumed


def _keep_global_batch(cfg: TrainConfig, state: dict[str, Any], ctx: Dist) -> None:
    """A run resumed on another number of processes keeps its global batch (hence its steps): the batch per
    process or the accumulation adapts, and the log says so."""
    saved = int(state.get("world_size", state.get("loader", {}).get("world_size", 1)))
    if saved == ctx.world_size:
        return
    before = (cfg.batch_size, cfg.grad_accum)
    cfg.batch_size, cfg.grad_accum = adapt_batch(cfg.batch_size, cfg.grad_accum, saved, ctx.world_size)
    if ctx.is_main:
        print(f"resuming a run of {saved} process(es) on {ctx.world_size}: batch {before[0]} × accumulation "
              f"{before[1]} per process becomes batch {cfg.batch_size} × accumulation {cfg.grad_accum}, keeping the "
              f"global batch of {before[0] * before[1] * saved}", file=sys.stderr)


def run(build: Callable[[Context], Method], settings: TrainOptions, *, verb: str, options: dict[str, Any],
        state: dict[str, Any] | None = None) -> Path:
    """Set up, build the method, train it in `settings.out` and report; `state` continues the run there.

    `options` (the method's own, as given) are saved with the run, so `--resume` rebuilds the same method.
    """
    cfg = settings.config()
    ctx = init_distributed(settings.device, cfg.strategy)
    out = Path(settings.out)
    finished = False
    try:
        if state is None and ctx.is_main:
            check_out_dir(out)
        torch.manual_seed(cfg.seed)  # the method's fresh weights (a head, adapters, a new model) come from it
        if state is not None:
            _keep_global_batch(cfg, state, ctx)
        # A sharded run's weights come back after sharding (lmforge.train.sharded); the method builds its model
        # as a new run would, with its frozen parts (a LoRA base) from the run's options.
        method = build(Context(ctx, cfg, out if state is not None and SHARDED not in state else None))
        check_run(method.model, strategy=cfg.strategy, batch_size=cfg.batch_size, precision=cfg.precision,
                  block_size=getattr(method.loader, "block_size", None), world_size=ctx.world_size,
                  optimizer=cfg.optimizer, checkpointing=cfg.activation_checkpointing,
                  memory_limit=cfg.memory_limit, device=ctx.device)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(out)
            print(f"{method.summary}; precision {cfg.precision}; {ctx.world_size} process(es) on {ctx.device}",
                  file=sys.stderr)
        result = train(method.model, method.loader, out, cfg, ctx=ctx, val_loader=method.val_loader,
                       loss_fn=method.loss, save=functools.partial(method.save, out), state=state,
                       run_info={"verb": verb, "options": options}, progress=settings.progress)
        if ctx.is_main:
            val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
            print(f"stopped by {result.stopped_by} at step {result.step}{val}; saved in {out}", file=sys.stderr)
        finished = True
        if result.stopped_by == "interrupted":  # saved; still not a finished run, and scripts must tell
            raise Interrupted(f"interrupted at step {result.step}; saved in {out}")
        return out
    finally:
        shutdown(ctx, wait_for_all=finished)  # after a failure the other ranks may never arrive
