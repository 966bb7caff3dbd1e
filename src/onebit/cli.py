"""Command line: ``onebit quantize``, ``onebit eval``, ``onebit methods``, ``onebit recipes``, ``onebit table``, ``onebit report``.

Every command checks what it can before any expensive step (``onebit.checks``), and all of them share one
error boundary (``OnebitCli``)."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from torch import Tensor
from typer.core import TyperGroup

from . import checks
from .data import corpora
from .errors import InputError, OnebitError
from .files import disk_full
from .methods import available_methods, method_options

console = Console(stderr=True)
log = logging.getLogger("onebit")

# OS errors that are the user's to fix (a path that is wrong, unwritable or full), not bugs
USER_ERRNOS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EROFS, errno.ENOSPC,
               errno.EDQUOT)


def expected_error(e: BaseException) -> str | None:
    """The one-paragraph message of an expected failure; None for anything else (a bug)."""
    if isinstance(e, OnebitError):
        return str(e)
    if disk_full(e):
        return (f"no space left on the device ({e}). Free space there or write elsewhere, then run the command "
                f"again (a quantize run continues at its first unfinished layer with --resume)")
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e}). Convert it to UTF-8"
    if isinstance(e, OSError) and e.errno in USER_ERRNOS:
        return f"{e.strerror}: {e.filename}. Check the path and its permissions"
    return None


class OnebitCli(TyperGroup):
    """The commands behind one error boundary: an expected failure (``expected_error``) ends as one paragraph
    on stderr and exit status 1; ``--debug`` (or ``ONEBIT_DEBUG=1``) re-raises it with its traceback. Anything
    else is a bug: traceback and a request to report it. Usage errors keep typer's exit status 2."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if "--debug" in args:  # a global option, also accepted after the command's name
            args = ["--debug", *(a for a in args if a != "--debug")]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            message = expected_error(e)
            if message is None:
                traceback.print_exc()
                typer.echo("This is a bug in onebit: please report it with the command line and the traceback above.",
                           err=True)
            else:
                typer.echo(f"error: {message} (--debug shows the traceback)", err=True)
            ctx.exit(1)


app = typer.Typer(cls=OnebitCli, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", envvar="ONEBIT_DEBUG",
                               help="show the traceback of expected errors too (any position; or ONEBIT_DEBUG=1)"),
) -> None:
    """1-bit post-training quantization of LLMs."""


def _data_dir_option() -> Any:
    return typer.Option(None, envvar="ONEBIT_DATA",
                        help="data directory (default: ../shared/data if present, else the text bundled with onebit)")


def _data_source_option() -> Any:
    return typer.Option("local", help="local (the data directory or bundled text) | hub (the public files from the "
                                      "Hugging Face Hub, downloaded once into its cache; needs network)")

# Flags shared by several methods; each is passed only to the methods that declare an option of that name.
METHOD_FLAGS = ("salient_metric", "iters", "iters_x", "cgb", "num_p", "share_mean", "group_partition", "haar_compat", "bits", "sym")


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def method_options_from_flags(method: str, flags: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """Method options from the shared flags (only the ones given) and ``--method-option key=value``."""
    valid = method_options(method)
    opts: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None:
            continue
        if name not in valid:
            raise typer.BadParameter(f"--{name.replace('_', '-')} does not apply to method {method!r}")
        opts[name] = value
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--method-option expects key=value, got {item!r}")
        opts[key.replace("-", "_")] = _parse_value(value)
    return opts


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onebit").setLevel(logging.INFO)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda requested but CUDA is not available")
    return device


def _model_checked(model_path: str, seqlens: dict[str, int]) -> tuple[Path, dict[str, Any]]:
    """Pre-flight on a model directory: config, family and weights present, each ``{option: seqlen}`` within
    its context."""
    path, cfg = checks.model_config(model_path)
    for option, n in seqlens.items():
        checks.context(cfg.get("max_position_embeddings"), n, option)
    return path, cfg


def _load_checked(path: Path, stream: bool = False) -> tuple[Any, Any, Path]:
    """``load_model`` and then no NaN/Inf in any weight (from the shards when streaming)."""
    from .models.loading import load_model

    model, tok, path = load_model(str(path), stream=stream)
    checks.finite_weights(checks.checkpoint_tensors(path) if stream else model.named_parameters(), str(path))
    return model, tok, path


def eval_sets(names: list[str], tok, src: corpora.DataSource, seqlen: int, windows: int | None) -> dict[str, Tensor]:
    """Each perplexity set tokenized once, before any model work; each must fill the windows asked for."""
    from .data import eval_ids

    sets = {}
    for name in names:
        ids = eval_ids(name, tok, src, seqlen)
        n = ids.numel() // seqlen
        if n == 0 or (windows is not None and n < windows):
            asked = "" if windows is None else f", fewer than the --eval-windows {windows} asked for"
            raise InputError(f"{name}: {ids.numel()} tokens make {n} evaluation windows of {seqlen}{asked}",
                             hint="Lower --eval-windows or the evaluation seqlen")
        sets[name] = ids
    if names:
        console.print(f"evaluation text: {', '.join(names)} from {src.label}")
    return sets


def evaluate_ppl(model, sets: dict[str, Tensor], seqlen: int, device: str, windows: int | None, label: str) -> dict[str, float]:
    from .eval import perplexity

    out = {}
    for name, ids in sets.items():
        t0 = time.perf_counter()
        out[name] = perplexity(model, ids, seqlen, device, windows)
        console.print(f"[bold]{label}[/] {name}: ppl {out[name]:.3f} ({time.perf_counter() - t0:.0f} s)")
    return out


def evaluate_zeroshot(model, tok, tasks: list[str], device: str, data_dir: str | None, limit: int | None,
                      task_data: str, batch_size: int, label: str) -> dict[str, Any]:
    """lm-eval zero-shot acc / acc_norm per task and their average (``onebit.eval.zeroshot``)."""
    from .eval.zeroshot import markdown, zeroshot

    t0 = time.perf_counter()
    z = zeroshot(model, tok, tasks, data_dir, limit, batch_size, device, task_data)
    z["seconds"] = time.perf_counter() - t0
    console.print(f"[bold]{label}[/] zero-shot (limit {limit}, {z['seconds']:.0f} s):\n{markdown(z)}")
    return z


def _tasks(tasks: str, task_data: str, data_dir: str | None) -> list[str]:
    """``--tasks``: comma-separated lm-eval task names, or ``all`` for the seven of framework §6; local task
    files are checked here, before any model work."""
    from .eval.zeroshot import TASKS, local_paths

    names = list(TASKS) if _csv(tasks) == ["all"] else _csv(tasks)
    if task_data not in ("local", "hub"):
        raise typer.BadParameter(f"--task-data must be local or hub, got {task_data!r}")
    if names and importlib.util.find_spec("lm_eval") is None:
        raise InputError("--tasks needs lm-eval, which is not installed", hint="pip install 'onebit[eval]'")
    for t in names if task_data == "local" else []:
        local_paths(t, data_dir)
    return names


@app.command()
def quantize(
    model_path: str = typer.Argument(..., help="local HF model directory, or 'smollm2' for the embedded default"),
    method: Optional[str] = typer.Option(None, help=f"binarization method (default braq): {', '.join(available_methods())}"),
    calib: str = typer.Option("c4", help="calibration set: wikitext2, c4, ptb, wikitext2-tok, shakespeare; NAME:SPLIT "
                                         "pins the split (train, valid, test; default train, else valid)"),
    eval: str = typer.Option("wikitext2", "--eval", help="comma-separated perplexity sets ('' for none)"),
    out: Optional[Path] = typer.Option(None, help="run directory: report.json (and --save output) go here"),
    nsamples: int = typer.Option(128, min=1),
    seqlen: int = typer.Option(2048, min=2),
    seed: int = typer.Option(0),
    blocksize: int = typer.Option(128, min=1),
    percdamp: float = typer.Option(0.01),
    gptq: bool = typer.Option(True, "--gptq/--no-gptq", help="error compensation (off = RTN mode, = --feedback none)"),
    feedback: str = typer.Option("auto", help="error feedback: block (BiLLM) | column (GPTQ) | none | auto (the method's paper)"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order",
                                             help="static act-order with column feedback (default: on for gptq only)"),
    fallback: str = typer.Option("auto", help="GGUF-type methods (fixed block): the method of linears whose "
                                              "in_features the block does not divide; auto = llama.cpp's (q4_0, then "
                                              "f16); none = refuse them"),
    true_sequential: bool = typer.Option(False, help="re-collect Hessians after each linear group"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto"),
    data_dir: Optional[str] = _data_dir_option(),
    data_source: str = _data_source_option(),
    eval_windows: Optional[int] = typer.Option(None, min=1, help="evaluate on the first N windows only"),
    eval_seqlen: Optional[int] = typer.Option(None, min=2, help="evaluation window length (default: --seqlen)"),
    fp_eval: bool = typer.Option(True, "--fp-eval/--no-fp-eval", help="also evaluate the unquantized model"),
    save: bool = typer.Option(False, help="write the fake-quantized model (save_pretrained) to OUT/model"),
    save_packed: Optional[Path] = typer.Option(None, help="write a packed 1-bit checkpoint here (docs/format.md)"),
    salient_metric: Optional[str] = typer.Option(None, help="hessian | magnitude (| l2 | l1 for HBLLM)"),
    iters: Optional[int] = typer.Option(None, help="ARB refinement iterations"),
    iters_x: Optional[int] = typer.Option(None, help="ARB-X refinement iterations"),
    cgb: Optional[bool] = typer.Option(None, "--cgb/--no-cgb", help="ARB column-group bitmap"),
    num_p: Optional[int] = typer.Option(None, help="ARB: repeat the split for more groups"),
    share_mean: Optional[bool] = typer.Option(None, "--share-mean/--no-share-mean", help="HBLLM shared row mean"),
    group_partition: Optional[str] = typer.Option(None, help="HBLLM: row | global"),
    haar_compat: Optional[bool] = typer.Option(None, "--haar-compat/--no-haar-compat", help="HBLLM reference constant"),
    bits: Optional[int] = typer.Option(None, help="rtn/gptq: bits per weight (2, 3, 4, 8)"),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="rtn/gptq: symmetric grid (no zero point)"),
    method_option: list[str] = typer.Option([], "--method-option", "-m", help="any method option as key=value"),
    transform: str = typer.Option("none", help="float pre-pass: none | dbell (DBellQuant's LTDB, docs/dbellquant.md) | "
                                                "rotate (randomized Hadamard of the residual stream, docs/rotation.md)"),
    rotate_seed: int = typer.Option(0, help="rotate: seed of the random Hadamard matrices"),
    rotate_heads: bool = typer.Option(False, help="rotate: also a per-head Hadamard between v_proj and o_proj (folded)"),
    rotate_down: bool = typer.Option(False, help="rotate: also an online Hadamard on down_proj's input (a hook; "
                                                  "not in a --save model, kept by --save-packed)"),
    act_bits: int = typer.Option(16, help="per-token activation fake quant of every decoder linear: 16 (off) | 8 | 6 | 4"),
    hessian_from_quantized_acts: bool = typer.Option(
        True, "--hessian-from-quantized-acts/--no-hessian-from-quantized-acts", help="H from x̂ (reference) or from x"),
    ltdb_epochs: int = typer.Option(200, min=0, help="LTDB: max SGD steps per 128-column block"),
    ltdb_lr: float = typer.Option(0.01, help="LTDB: SGD learning rate"),
    ltdb_p: float = typer.Option(1.0, help="LTDB: DTNP loss exponent (1 = paper's ablation winner, 2 = release)"),
    ltdb_opt: str = typer.Option("ltdb", help="OPT models: ltdb | smoothquant (the release's plain SmoothQuant path)"),
    act_scales: Optional[Path] = typer.Option(None, help="act scales from `onebit act-scales` (default: from calibration)"),
    bpw_budget: Optional[float] = typer.Option(None, help="storage bpw bound over all quantized linears: each linear is solved "
                                                          "with every budget candidate and the engine keeps one per linear "
                                                          "(docs/budget.md); the candidates name the methods"),
    budget_objective: str = typer.Option("weight", help="what the budget's choice minimizes: weight (Σ tr(ΔW H ΔWᵀ)) or "
                                                       "output (each linear's error weighted by its measured effect on "
                                                       "the layer's output; docs/budget.md)"),
    budget_candidates: str = typer.Option("lean", help="the budget's candidates: a set's name (`onebit recipes`) or a JSON "
                                                       "list of {\"method\": ..., \"options\": {...}}"),
    recipe: Optional[str] = typer.Option(None, help="a named configuration (`onebit recipes`): lean2 (≤ 2.0 storage bpw), "
                                                    "lean15 (≤ 1.5), dbellquant (the DBellQuant release); what it "
                                                    "sets cannot be given again"),
    name: Optional[str] = typer.Option(None, help="run name in tables (default: the method)"),
    tasks: str = typer.Option("", help="zero-shot lm-eval tasks after quantizing ('all' = the seven; needs onebit[eval])"),
    limit: Optional[int] = typer.Option(None, min=1, help="zero-shot: first N documents per task"),
    task_data: str = typer.Option("local", help="zero-shot documents: local (data dir) | hub (official sources, online)"),
    batch_size: int = typer.Option(16, min=1, help="zero-shot batch size"),
    stream: bool = typer.Option(False, help="never load the whole model: read one decoder layer at a time (needs --out)"),
    resume: bool = typer.Option(False, help="continue a killed run in --out at the first layer not written"),
    offload_acts: Optional[Path] = typer.Option(None, help="keep calibration activations in memory-mapped files here"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Binarize MODEL_PATH's decoder linears, evaluate perplexity (and zero-shot), write OUT/report.json."""
    from . import api
    from .config import CalibConfig, QuantConfig
    from .data import calib_eval_overlap, calibration_samples
    from .engine.distributed import init_from_env, is_main
    from .engine.store import StreamedModel, save_streamed
    from .export.packed import save_model_dir
    from .models.loading import load_tokenizer
    from .progress import progress_bars
    from .report import print_table, versions, write_json

    _setup_logging(verbose)
    flags = dict(salient_metric=salient_metric, iters=iters, iters_x=iters_x, cgb=cgb, num_p=num_p,
                 share_mean=share_mean, group_partition=group_partition, haar_compat=haar_compat, bits=bits, sym=sym)
    fields = dict(transform=transform, act_bits=act_bits, hessian_from_quantized_acts=hessian_from_quantized_acts,
                  ltdb_epochs=ltdb_epochs, ltdb_lr=ltdb_lr, ltdb_p=ltdb_p, ltdb_opt=ltdb_opt,
                  act_scales=None if act_scales is None else str(act_scales), feedback=feedback, act_order=act_order,
                  rotate_seed=rotate_seed, rotate_heads=rotate_heads, rotate_down=rotate_down, fallback=fallback,
                  bpw_budget=bpw_budget, budget_candidates=_budget_candidates(budget_candidates),
                  budget_objective=budget_objective)
    preset = _recipe_fields(recipe, fields)
    rec_method, rec_options = preset.pop("method", None), preset.pop("method_options", {})
    fields.update(preset)
    if fields["bpw_budget"] is not None and (method or method_option or any(v is not None for v in flags.values())):
        raise typer.BadParameter("with a bit budget the candidates name the methods and their options "
                                 "(--budget-candidates): drop --method and the method options")
    if rec_method is not None and method not in (None, rec_method):
        raise typer.BadParameter(f"--recipe {recipe} sets --method {rec_method}: drop --method")
    method = method or rec_method or "braq"
    try:
        options = method_options_from_flags(method, flags, method_option)
        if set(options) & set(rec_options):
            raise ValueError(f"--recipe {recipe} sets the method options {', '.join(sorted(rec_options))}: drop them")
        qcfg = QuantConfig(method, {**rec_options, **options}, blocksize, percdamp, gptq,
                           true_sequential, _resolve_device(device), **fields)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if save and rotate_down:
        raise typer.BadParameter("--save writes a plain transformers model, which cannot hold --rotate-down's online "
                                 "Hadamard: use --save-packed")
    _check_quantize_options(qcfg, out, stream, resume, save_packed)
    t_start = time.perf_counter()
    # pre-flight: everything that can fail is checked before the model is loaded
    src = corpora.data_source(data_dir, data_source)
    zs_tasks = _tasks(tasks, task_data, data_dir)
    eval_seqlen = eval_seqlen or seqlen
    path, model_cfg = _model_checked(model_path, {"--seqlen": seqlen, "--eval-seqlen": eval_seqlen})
    if act_scales is not None:
        checks.input_file(act_scales, "--act-scales")
    _check_quantize_outputs(path, model_cfg, out, save, save_packed, offload_acts, resume, nsamples * seqlen)
    ccfg = CalibConfig(calib, nsamples, seqlen, seed)
    datasets = _csv(eval)
    tok = load_tokenizer(path)
    samples, source = calibration_samples(calib, tok, nsamples, seqlen, seed, src)
    console.print(f"calibration: {nsamples} × {seqlen} tokens from {source} ({src.label})")
    sets = eval_sets(datasets, tok, src, eval_seqlen, eval_windows)
    overlap = calib_eval_overlap(source, datasets)
    if overlap:
        log.warning("the calibration text (%s) is also evaluated: the %s perplexity is measured on text the model was "
                    "calibrated on (report.json: calib_eval_overlap)", source, " and ".join(overlap))
    init_from_env(qcfg.device)
    main = is_main()
    model, tok, path = _load_checked(path, stream)
    api.start_plan(model, qcfg)  # a bit budget below its candidates' floor is refused here, before any work
    report: dict[str, Any] = dict(
        name=name or recipe or run_label(qcfg), method=qcfg.method, model=str(path), config=qcfg.to_dict(), calibration=dict(ccfg.to_dict(), source=source),
        eval=dict(datasets=datasets, seqlen=eval_seqlen, windows=eval_windows), data_source=src.label,
        calib_eval_overlap=overlap, versions=versions(),
    )
    ckpt = None if out is None else _layer_checkpoint(out, str(path), qcfg.to_dict(), ccfg.to_dict(), versions()["onebit"])
    with progress_bars(enabled=main):
        if fp_eval and datasets and main:
            report["ppl_fp"] = evaluate_ppl(model, sets, eval_seqlen, qcfg.device, eval_windows, "fp")
        if fp_eval and zs_tasks and main:
            report["zeroshot_fp"] = evaluate_zeroshot(model, tok, zs_tasks, qcfg.device, data_dir, limit, task_data,
                                                      batch_size, "fp")
        before = _plot_snapshot(model, qcfg, out)
        collector = _pack_collector(model, qcfg, save_packed, stream)
        res = api.quantize(model, qcfg, samples, on_layer=collector, checkpoint=ckpt, resume=resume, offload_acts=offload_acts)
        if not main:
            return  # the other ranks helped with calibration and solving; rank 0 evaluates and writes
        if stream:
            model = StreamedModel(path, overrides=ckpt.weights)
        if before:
            from .transforms.plots import plot_weight_histograms

            report["plots"] = [p.name for p in plot_weight_histograms(before, res.transform_scales, out)]
        if res.transform:
            report["transform"] = res.transform
        report.update(paper_bpw=res.paper_bpw, storage_bpw=res.storage_bpw, bits=res.bits.to_dict(), seconds=res.seconds,
                      layers=[r.to_dict() for r in res.layers])
        report["plan"] = _print_plan(res.layers)
        if res.budget:
            report["budget"] = res.budget
            console.print(f"bit budget {res.budget['bpw_budget']:g}: {res.budget['storage_bpw']:.4f} storage bpw "
                          f"(floor {res.budget['floor_bpw']:.4f})")
        report["ppl"] = evaluate_ppl(model, sets, eval_seqlen, qcfg.device, eval_windows, qcfg.method)
        if zs_tasks:
            report["zeroshot"] = evaluate_zeroshot(model, tok, zs_tasks, qcfg.device, data_dir, limit, task_data,
                                                   batch_size, qcfg.method)
    report["wall_seconds"] = time.perf_counter() - t_start
    if out is not None:
        write_json(out / "report.json", report)
        if save:
            (save_streamed if stream else save_model_dir)(model, out / "model", tok)
        console.print(f"report: {out / 'report.json'}")
    if save_packed is not None:
        _write_packed(model, tok, save_packed, collector.packed if collector else None, qcfg, res.bits, ckpt)
    print_table([report])


def _check_quantize_options(qcfg, out: Path | None, stream: bool, resume: bool, save_packed: Path | None) -> None:
    """Option combinations that cannot work (usage errors, exit status 2)."""
    from .formats.packed import PackedFormatError, check_packable

    if (stream or resume) and out is None:
        raise typer.BadParameter("--stream and --resume need --out (the run directory holds the layer checkpoints)")
    if stream and (qcfg.transform != "none" or qcfg.act_bits is not None):
        raise typer.BadParameter("--stream reads one layer at a time; --transform and --act-bits need the whole model "
                                 "in memory: drop --stream or them")
    if save_packed is not None and qcfg.act_bits is not None:
        raise typer.BadParameter("--save-packed stores weights only; activation quantization (--act-bits) is not in the format")
    if save_packed is not None:
        try:
            for c in qcfg.budget_candidates if qcfg.bpw_budget is not None else [{"method": qcfg.method}]:
                check_packable(c["method"])
        except PackedFormatError as e:
            raise typer.BadParameter(str(e)) from None


def _budget_candidates(value: str) -> str | list[dict[str, Any]]:
    """``--budget-candidates``: a set's name, or a JSON list."""
    if not value.lstrip().startswith("["):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--budget-candidates is not valid JSON: {e}") from None


def _recipe_fields(name: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    """The QuantConfig fields ``--recipe NAME`` sets; an option it sets that was also given is refused."""
    import dataclasses

    from .config import QuantConfig
    from .recipes import recipe

    if name is None:
        return {}
    try:
        preset = recipe(name)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    defaults = {f.name: f.default for f in dataclasses.fields(QuantConfig)}
    given = [k for k in preset if k in fields and fields[k] != defaults[k]]  # method, options: checked by the caller
    if given:
        raise typer.BadParameter(f"--recipe {name} sets {', '.join('--' + k.replace('_', '-') for k in given)}: drop them")
    return preset


def _check_quantize_outputs(path: Path, model_cfg: dict[str, Any], out: Path | None, save: bool, save_packed: Path | None,
                            offload_acts: Path | None, resume: bool, calib_tokens: int) -> None:
    """Every output can be written, and the disk has room for what the run will write there (estimated from
    the checkpoint's tensor shapes: layer checkpoints, --save, --save-packed, --offload-acts)."""
    for p, option in ((out, "--out"), (save_packed, "--save-packed"), (offload_acts, "--offload-acts")):
        if p is not None:
            checks.output(p, option)
    counts = checks.weight_counts(path, model_cfg["model_type"])
    needs: dict[Path, int] = {}
    if counts is not None and out is not None:
        done = sum(f.stat().st_size for f in (out / "layers").glob("layer_*.safetensors")) if resume else 0
        needs[out / "layers"] = max(int(counts[0] * checks.PACKED_BYTES_PER_WEIGHT) - done, 0)
        if save:
            needs[out / "model"] = sum(counts) * checks.FLOAT_BYTES
    if counts is not None and save_packed is not None:
        needs[save_packed] = checks.packed_bytes(counts)
    if offload_acts is not None:  # layer inputs, float outputs and quantized outputs
        needs[offload_acts] = 3 * calib_tokens * model_cfg.get("hidden_size", 0) * checks.FLOAT_BYTES
    checks.free_space(needs)


def _layer_checkpoint(out: Path, model: str, config: dict[str, Any], calibration: dict[str, Any], onebit: str):
    """A run's layer checkpoints; the settings are the run's fingerprint (what determines every layer)."""
    from .engine.checkpoint import LayerCheckpoint, run_settings

    return LayerCheckpoint(out / "layers", run_settings(model, config, calibration, onebit))


def _pack_collector(model, qcfg, save_packed: Path | None, stream: bool):
    """The ``on_layer`` callback that packs each linear for ``--save-packed`` (None when not asked, or when
    streaming: then the packed checkpoint is built from the layer checkpoints after the run)."""
    if save_packed is None or stream:
        return None
    from .export.packed import PackCollector
    from .models import get_adapter

    return PackCollector(get_adapter(model))


def _write_packed(model, tok, out_dir: Path, packed, qcfg, bits, ckpt=None) -> None:
    """``packed`` from a collector with ``model`` in memory; else (``model`` streamed) from ``ckpt``'s layers."""
    from .export.packed import packed_from_layers, save_packed, save_packed_streamed

    options = qcfg.to_dict()["method_options"]
    if packed is not None:
        from .models import get_adapter
        from .transforms.rotate import down_input_transforms

        online = down_input_transforms(get_adapter(model), packed, qcfg.rotate_seed) if qcfg.rotate_down else None
        save_packed(model, out_dir, packed, qcfg.method, options, qcfg.blocksize, bits, tok, online)
    else:
        n = len(model.adapter.decoder_layers(model.model))
        ckpt.bind(qcfg.plan())
        packed = packed_from_layers(ckpt, model.adapter.layers, n)
        save_packed_streamed(model, out_dir, packed, qcfg.method, options, qcfg.blocksize, bits, tok)
    _print_packed(out_dir, bits)


def _print_packed(out_dir: Path, bits) -> None:
    from .formats.checkpoint import measured_bpw

    m = measured_bpw(out_dir)
    console.print(
        f"packed checkpoint: {out_dir}  storage bpw: report {bits.storage_bpw:.4f}, measured from bytes "
        f"{m['storage_bpw_measured']:.4f} (padding {m['padding_bits']} bits; index {m['index_bpw']:.4f} bpw); "
        f"paper bpw {bits.paper_bpw:.4f}; file {m['file_bytes'] / 2**20:.1f} MiB"
    )


def _print_plan(layers) -> dict[str, Any]:
    """Per method and block size: linears, weights, storage bpw (printed when linears differ, e.g. a fallback)."""
    from .engine.pipeline import plan_summary

    plan = plan_summary(layers)
    if len(plan) > 1:
        for key, g in plan.items():
            console.print(f"{key}: {g['linears']} linears, {g['weights']} weights, {g['storage_bpw']:.4f} bpw")
    return plan


def run_label(cfg) -> str:
    """Default run name: the method (with its bits; a bit budget: ``budget`` and its bound), the pre-pass
    (rotate's options), activation bits and error feedback when it is not the method's default."""
    extras = [k for k, on in (("heads", cfg.rotate_heads), ("down", cfg.rotate_down)) if on]
    what = cfg.method if cfg.bpw_budget is None else f"budget{cfg.bpw_budget:g}"
    label = what if cfg.transform == "none" else "-".join([cfg.transform, *extras]) + f"+{what}"
    opts = cfg.method_options
    label += f" w{opts['bits']}" if "bits" in opts else ""
    if cfg.feedback != getattr(cfg.build_method(), "default_feedback", "block"):
        label += f" {cfg.feedback}-fb"
    return label + (f" A{cfg.act_bits}" if cfg.act_bits else "")


def _plot_snapshot(model, cfg, out: Path | None) -> dict[str, Any]:
    """Copies of a few linears' weights before the transform, for the histogram PNGs (needs matplotlib)."""
    if cfg.transform != "dbell" or out is None:
        return {}
    if importlib.util.find_spec("matplotlib") is None:
        console.print("matplotlib absent (pip install 'onebit[plots]'): no weight histograms")
        return {}
    from .models import get_adapter
    from .transforms.plots import pick_plot_linears

    adapter = get_adapter(model)
    n_layers = len(adapter.decoder_layers(model))
    names = [f"{adapter.layers}.{i}.{n}" for i in range(n_layers) for g in adapter.groups if g.feeder_kind == "norm"
             for n in g.linears]
    return {n: model.get_submodule(n).weight.detach().float().clone() for n in pick_plot_linears(names, n_layers)}


@app.command("act-scales")
def act_scales_cmd(
    model_path: str = typer.Argument(..., help="local HF model directory, or 'smollm2'"),
    calib: str = typer.Option("c4", help="calibration set: wikitext2, c4, ptb, wikitext2-tok, shakespeare (NAME:SPLIT)"),
    out: Path = typer.Option(..., help="output .safetensors file"),
    nsamples: int = typer.Option(128, min=1),
    seqlen: int = typer.Option(2048, min=2),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    data_dir: Optional[str] = _data_dir_option(),
    data_source: str = _data_source_option(),
) -> None:
    """Per-channel max |input| of every decoder linear over calibration windows (DBellQuant's act_scales)."""
    from .data import calibration_samples
    from .models import get_adapter
    from .models.loading import load_tokenizer
    from .progress import progress_bars
    from .transforms import compute_act_scales, save_act_scales

    _setup_logging(False)
    src = corpora.data_source(data_dir, data_source)
    path, _ = _model_checked(model_path, {"--seqlen": seqlen})
    checks.output(out, "--out", "file")
    samples, source = calibration_samples(calib, load_tokenizer(path), nsamples, seqlen, seed, src)
    model, _, _ = _load_checked(path)
    with progress_bars():
        scales = compute_act_scales(model, get_adapter(model), samples, _resolve_device(device))
    save_act_scales(scales, out)
    console.print(f"{len(scales)} linears, {nsamples} × {seqlen} tokens from {source} ({src.label}) → {out}")


@app.command("eval")
def eval_cmd(
    model_path: str = typer.Argument(..., help="local HF model directory, a run directory saved with --save, or 'smollm2'"),
    ppl: Optional[str] = typer.Option(None, help="comma-separated perplexity sets (default wikitext2 unless --tasks)"),
    tasks: str = typer.Option("", help="zero-shot lm-eval tasks ('all' = the seven of the papers; needs onebit[eval])"),
    limit: Optional[int] = typer.Option(None, min=1, help="zero-shot: first N documents per task"),
    task_data: str = typer.Option("local", help="zero-shot documents: local (data dir) | hub (official sources, online)"),
    batch_size: int = typer.Option(16, min=1, help="zero-shot batch size"),
    seqlen: int = typer.Option(2048, min=2),
    device: str = typer.Option("auto"),
    data_dir: Optional[str] = _data_dir_option(),
    data_source: str = _data_source_option(),
    eval_windows: Optional[int] = typer.Option(None, min=1),
) -> None:
    """Perplexity (exactly as the papers compute it) and/or zero-shot accuracy of a float or fake-quantized model."""
    from .models.loading import load_tokenizer
    from .progress import progress_bars

    _setup_logging(False)
    zs_tasks = _tasks(tasks, task_data, data_dir)
    names = _csv(ppl) if ppl is not None else ([] if zs_tasks else ["wikitext2"])
    if (Path(model_path) / "model" / "config.json").exists():  # a run directory written with --save
        model_path = str(Path(model_path) / "model")
    path, _ = _model_checked(model_path, {"--seqlen": seqlen} if names else {})
    sets = eval_sets(names, load_tokenizer(path), corpora.data_source(data_dir, data_source), seqlen, eval_windows)
    model, tok, _ = _load_checked(path)
    dev, out = _resolve_device(device), {}
    if sets:
        with progress_bars():
            out["ppl"] = evaluate_ppl(model, sets, seqlen, dev, eval_windows, "model")
    if zs_tasks:
        out["zeroshot"] = evaluate_zeroshot(model, tok, zs_tasks, dev, data_dir, limit, task_data, batch_size, "model")
    typer.echo(json.dumps(out))


@app.command()
def methods() -> None:
    """List the methods and their options with defaults."""
    for m in available_methods():
        typer.echo(f"{m}: {json.dumps(method_options(m))}")


@app.command()
def recipes() -> None:
    """List the named recipes (`--recipe`) and budget candidate sets (`--budget-candidates`), docs/budget.md."""
    from .recipes import CANDIDATES, RECIPES

    for name, fields in RECIPES.items():
        typer.echo(f"recipe {name}: {json.dumps(fields)}")
    for name, cands in CANDIDATES.items():
        typer.echo(f"candidates {name}: {json.dumps(cands)}")


@app.command()
def table(run_dirs: list[Path] = typer.Argument(..., help="directories written by `onebit quantize --out`"),
          markdown: bool = typer.Option(False, help="print GitHub markdown")) -> None:
    """Compare runs: ppl, paper bpw, storage bpw and seconds, one row per run."""
    from .report import load_report, markdown_table, print_table

    reports = [load_report(d) for d in run_dirs]
    if markdown:
        typer.echo(markdown_table(reports))
    else:
        print_table(reports, Console())


@app.command()
def report(run_dirs: list[Path] = typer.Argument(..., help="directories written by `onebit quantize --out`"),
           out: Path = typer.Option(Path("runs/report"), help="where report.md and the PNG plots go"),
           frontier: bool = typer.Option(False, help="perplexity vs storage bpw with the Pareto front; seeds pooled "
                                                      "(frontier.md, frontier.png)")) -> None:
    """Compare runs: one markdown table (bpw, ppl, zero-shot, seconds) and plots (ppl vs storage bpw, per-layer error)."""
    from .report import write_report

    checks.output(out, "--out")
    md, paths = write_report(run_dirs, out, frontier)
    typer.echo(md)
    console.print("wrote " + ", ".join(str(p) for p in paths))


@app.command()
def pack(
    run_dir: Path = typer.Argument(..., help="an `onebit quantize --out RUN` directory (report.json + layers/ or model/)"),
    out: Path = typer.Option(..., help="where to write the packed checkpoint"),
) -> None:
    """Pack a finished run after the fact: from its layer checkpoints (any packable method; never loads the
    whole model), or else by re-deriving the stored form from `--save` fake-quant weights (sign only)."""
    from .config import QuantConfig
    from .engine.store import StreamedModel
    from .methods.base import Bits
    from .models.loading import load_tokenizer
    from .report import load_report

    report = load_report(run_dir)
    cfg = report["config"]
    if cfg.get("act_bits") is not None:
        raise typer.BadParameter("this run quantized activations (--act-bits); the packed format stores weights only")
    # a transform (DBellQuant) changed the norms: only the run's saved model has them
    source = run_dir / "model" if (run_dir / "model").exists() else Path(report["model"])
    if cfg.get("transform", "none") != "none" and source != run_dir / "model":
        raise typer.BadParameter(f"{run_dir}: a --transform run needs its --save model/ (the folded norms) to pack")
    source, model_cfg = checks.model_config(str(source))
    checks.output(out, "--out")
    counts = checks.weight_counts(source, model_cfg["model_type"])
    checks.free_space({} if counts is None else {out: checks.packed_bytes(counts)})
    if (run_dir / "layers").exists():
        ckpt = _layer_checkpoint(run_dir, report["model"], cfg, report["calibration"], report["versions"]["onebit"])
        _write_packed(StreamedModel(source), load_tokenizer(source), out, None, QuantConfig.from_dict(cfg),
                      Bits.from_dict(report["bits"]), ckpt)
    else:
        _repack_saved(run_dir, out, report)


def _repack_saved(run_dir: Path, out: Path, report: dict[str, Any]) -> None:
    """Re-derive each linear's stored form from fake-quant weights (methods whose Ŵ determines it: sign)."""
    from .export.packed import save_packed
    from .formats.repack import repack_linear
    from .methods.base import Bits
    from .models import get_adapter
    from .models.loading import load_model

    method, block_size = report["method"], report["config"]["blocksize"]
    model, tok, _ = load_model(str(run_dir / "model"))
    adapter = get_adapter(model)
    packed = {}
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for name, lin in adapter.linears(layer).items():
            full = f"{adapter.layers}.{i}.{name}"
            packed[full] = repack_linear(method, lin.weight, block_size, full)
    bits = Bits.from_dict(report["bits"])
    save_packed(model, out, packed, method, report["config"]["method_options"], block_size, bits, tok)
    _print_packed(out, bits)


@app.command("export-gguf")
def export_gguf(
    source: Path = typer.Argument(..., help="a run directory (`onebit quantize --out RUN`) or a packed checkpoint"),
    out: Path = typer.Argument(..., help="the .gguf file to write (llama.cpp)"),
    float_type: str = typer.Option("auto", help="embeddings and lm_head: auto (F16 where lossless, else F32) | f32 | "
                                                "f16 | q8_0"),
    eval: str = typer.Option("auto", "--eval", help="perplexity of the written GGUF, reloaded by transformers: "
                                                    "comma-separated sets; auto = wikitext2 for a projection, none for "
                                                    "a lossless export ('' = none)"),
    eval_seqlen: Optional[int] = typer.Option(None, min=2, help="evaluation window (default: the run's, else 2048)"),
    eval_windows: Optional[int] = typer.Option(None, min=1, help="first N windows (default: the run's)"),
    data_dir: Optional[str] = _data_dir_option(),
    data_source: str = _data_source_option(),
    device: str = typer.Option("auto"),
) -> None:
    """Write a llama.cpp GGUF. Linears quantized with a GGUF block type (q1_0, tq1_0, tq2_0, q2_k and their
    fallbacks q4_0, q8_0, f16) are written in that type, bit-exactly; any other method's Ŵ is projected onto
    Q1_0 (lossy: a warning states the projection's perplexity)."""
    from .export.gguf import export_gguf as write_gguf
    from .export.gguf import open_source

    from .models.loading import load_tokenizer

    checks.output(out, "OUT", "file")
    src = open_source(source)
    run = src.report or {}
    settings = run.get("eval") or {}
    seqlen, windows = eval_seqlen or settings.get("seqlen") or 2048, eval_windows or settings.get("windows")
    requested = None if eval == "auto" else _csv(eval)
    # the evaluation text is checked (and tokenized) before the export work
    sets = eval_sets(requested if requested is not None else ["wikitext2"], load_tokenizer(src.model_dir),
                     corpora.data_source(data_dir, data_source), seqlen, windows) if requested != [] else {}
    summary = write_gguf(src, out, float_type)
    _print_gguf(summary, out)
    if requested is None and summary["exact"]:
        sets = {}  # auto: a lossless export is the run itself
    if sets:
        summary["ppl_gguf"] = _eval_gguf(out, src.model_dir, sets, seqlen, windows, _resolve_device(device))
        measured = run.get("ppl") or {}
        for d, ppl in summary["ppl_gguf"].items():
            console.print(f"{d}: GGUF ppl {ppl:.3f}" + (f"; the run measured {measured[d]:.3f}" if d in measured else ""))
    if not summary["exact"]:
        methods = sorted({r["method"] for r in summary["linears"] if not r["exact"]})
        measured = ", ".join(f"{d} {p:.1f}" for d, p in summary.get("ppl_gguf", {}).items()) or "not measured (--eval)"
        console.print(f"[bold yellow]warning[/]: {summary['projected_linears']} linears ({', '.join(methods)}) have no "
                      f"GGUF type and were projected onto Q1_0/F16: this file is not the model the run measured; "
                      f"the projection's perplexity: {measured}")
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "linears"}))  # the table above lists them


def _print_gguf(summary: dict[str, Any], out: Path) -> None:
    """The linears by GGUF type (bpw as written), and which linears (module, in_features) got which type."""
    from rich.table import Table

    t = Table(title=f"{out}: {summary['file_bytes'] / 2**20:.1f} MiB; linears {summary['linear_bpw']:.4f} bpw")
    for col in ("GGUF type", "methods", "linears", "weights", "bpw"):
        t.add_column(col)
    for name, g in summary["by_type"].items():
        t.add_row(name, ", ".join(g["methods"]), str(g["linears"]), str(g["weights"]), f"{g['bpw']:.4f}")
    console.print(t)
    kinds: dict[tuple[str, int, str], int] = {}
    for r in summary["linears"]:
        key = (r["name"].split(".", 3)[-1], r["shape"][1], f"{r['type']} ({r['method']}, block {r['block_size']})")
        kinds[key] = kinds.get(key, 0) + 1
    for (module, width, how), n in sorted(kinds.items()):
        console.print(f"  {module} (in {width}): {how} ×{n}")


def _eval_gguf(path: Path, model_dir: Path, sets: dict[str, Tensor], seqlen: int, windows: int | None,
              device: str) -> dict[str, float]:
    """Perplexity of the GGUF reloaded by transformers (by onebit's reader where gguf cannot decode a type)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .export.gguf import load_gguf_model
    from .progress import progress_bars

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        how = "transformers"
    except NotImplementedError as e:  # gguf 0.19 cannot decode Q1_0
        model, how = load_gguf_model(path, model_dir), f"onebit's reader (transformers: {e})"
    console.print(f"reloaded {path} with {how}")
    with progress_bars():
        return evaluate_ppl(model.eval(), sets, seqlen, device, windows, "gguf")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
