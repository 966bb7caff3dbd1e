"""Command line: ``onebit quantize``, ``onebit eval``, ``onebit methods``, ``onebit table``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from .methods import available_methods, method_options

app = typer.Typer(add_completion=False, no_args_is_help=True, help="1-bit post-training quantization of LLMs.")
console = Console(stderr=True)

# Flags shared by several methods; each is passed only to the methods that declare an option of that name.
METHOD_FLAGS = ("salient_metric", "iters", "iters_x", "cgb", "num_p", "share_mean", "group_partition", "haar_compat")


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


def evaluate_ppl(model, tok, datasets: list[str], seqlen: int, device: str, data_dir: str | None, windows: int | None, label: str) -> dict[str, float]:
    from .data import eval_ids
    from .eval import perplexity
    from .models import get_adapter

    out = {}
    for name in datasets:
        ids = eval_ids(name, tok, data_dir, seqlen)
        t0 = time.perf_counter()
        out[name] = perplexity(model, get_adapter(model), ids, seqlen, device, windows)
        console.print(f"[bold]{label}[/] {name}: ppl {out[name]:.3f} ({time.perf_counter() - t0:.0f} s)")
    return out


@app.command()
def quantize(
    model_path: str = typer.Argument(..., help="local HF model directory, or 'smollm2' for the embedded default"),
    method: str = typer.Option("braq", help=f"binarization method: {', '.join(available_methods())}"),
    calib: str = typer.Option("c4", help="calibration set: wikitext2, c4, ptb, wikitext2-tok, shakespeare"),
    eval: str = typer.Option("wikitext2", "--eval", help="comma-separated perplexity sets ('' for none)"),
    out: Optional[Path] = typer.Option(None, help="run directory: report.json (and --save output) go here"),
    nsamples: int = typer.Option(128, min=1),
    seqlen: int = typer.Option(2048, min=2),
    seed: int = typer.Option(0),
    blocksize: int = typer.Option(128, min=1),
    percdamp: float = typer.Option(0.01),
    gptq: bool = typer.Option(True, "--gptq/--no-gptq", help="block-wise error compensation (off = RTN mode)"),
    true_sequential: bool = typer.Option(False, help="re-collect Hessians after each linear group"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto"),
    data_dir: Optional[str] = typer.Option(None, envvar="ONEBIT_DATA", help="data directory (default ../shared/data)"),
    eval_windows: Optional[int] = typer.Option(None, min=1, help="evaluate on the first N windows only"),
    eval_seqlen: Optional[int] = typer.Option(None, min=2, help="evaluation window length (default: --seqlen)"),
    fp_eval: bool = typer.Option(True, "--fp-eval/--no-fp-eval", help="also evaluate the unquantized model"),
    save: bool = typer.Option(False, help="write the fake-quantized model (save_pretrained) to OUT/model"),
    salient_metric: Optional[str] = typer.Option(None, help="hessian | magnitude (| l2 | l1 for HBLLM)"),
    iters: Optional[int] = typer.Option(None, help="ARB refinement iterations"),
    iters_x: Optional[int] = typer.Option(None, help="ARB-X refinement iterations"),
    cgb: Optional[bool] = typer.Option(None, "--cgb/--no-cgb", help="ARB column-group bitmap"),
    num_p: Optional[int] = typer.Option(None, help="ARB: repeat the split for more groups"),
    share_mean: Optional[bool] = typer.Option(None, "--share-mean/--no-share-mean", help="HBLLM shared row mean"),
    group_partition: Optional[str] = typer.Option(None, help="HBLLM: row | global"),
    haar_compat: Optional[bool] = typer.Option(None, "--haar-compat/--no-haar-compat", help="HBLLM reference constant"),
    method_option: list[str] = typer.Option([], "--method-option", "-m", help="any method option as key=value"),
    name: Optional[str] = typer.Option(None, help="run name in tables (default: the method)"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Binarize MODEL_PATH's decoder linears, evaluate perplexity, write OUT/report.json."""
    from . import api
    from .config import CalibConfig, QuantConfig
    from .data import calibration_samples
    from .models.loading import load_model
    from .progress import progress_bars
    from .report import print_table, versions, write_json

    _setup_logging(verbose)
    flags = dict(salient_metric=salient_metric, iters=iters, iters_x=iters_x, cgb=cgb, num_p=num_p,
                 share_mean=share_mean, group_partition=group_partition, haar_compat=haar_compat)
    try:
        qcfg = QuantConfig(method, method_options_from_flags(method, flags, method_option), blocksize, percdamp, gptq,
                           true_sequential, _resolve_device(device))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    ccfg = CalibConfig(calib, nsamples, seqlen, seed)
    datasets = _csv(eval)
    t_start = time.perf_counter()
    model, tok, path = load_model(model_path)
    eval_seqlen = eval_seqlen or seqlen
    api.check_seqlen(model, max(seqlen, eval_seqlen))
    samples, source = calibration_samples(calib, tok, nsamples, seqlen, seed, data_dir)
    console.print(f"calibration: {nsamples} × {seqlen} tokens from {source}")
    report: dict[str, Any] = dict(
        name=name or method, method=method, model=str(path), config=qcfg.to_dict(), calibration=dict(ccfg.to_dict(), source=source),
        eval=dict(datasets=datasets, seqlen=eval_seqlen, windows=eval_windows), versions=versions(),
    )
    with progress_bars():
        if fp_eval and datasets:
            report["ppl_fp"] = evaluate_ppl(model, tok, datasets, eval_seqlen, qcfg.device, data_dir, eval_windows, "fp")
        res = api.quantize(model, qcfg, samples)
        report.update(paper_bpw=res.paper_bpw, storage_bpw=res.storage_bpw, bits=res.bits.to_dict(), seconds=res.seconds,
                      layers=[r.to_dict() for r in res.layers])
        report["ppl"] = evaluate_ppl(model, tok, datasets, eval_seqlen, qcfg.device, data_dir, eval_windows, method)
    report["wall_seconds"] = time.perf_counter() - t_start
    if out is not None:
        write_json(out / "report.json", report)
        if save:
            model.save_pretrained(out / "model")
            tok.save_pretrained(out / "model")
        console.print(f"report: {out / 'report.json'}")
    print_table([report])


@app.command("eval")
def eval_cmd(
    model_path: str = typer.Argument(..., help="local HF model directory, or 'smollm2'"),
    ppl: str = typer.Option("wikitext2", help="comma-separated perplexity sets"),
    seqlen: int = typer.Option(2048, min=2),
    device: str = typer.Option("auto"),
    data_dir: Optional[str] = typer.Option(None, envvar="ONEBIT_DATA"),
    eval_windows: Optional[int] = typer.Option(None, min=1),
) -> None:
    """Perplexity of a (fake-quantized or float) model, exactly as the papers compute it."""
    from . import api
    from .models.loading import load_model
    from .progress import progress_bars

    _setup_logging(False)
    model, tok, _ = load_model(model_path)
    api.check_seqlen(model, seqlen)
    with progress_bars():
        res = evaluate_ppl(model, tok, _csv(ppl), seqlen, _resolve_device(device), data_dir, eval_windows, "model")
    typer.echo(json.dumps({"ppl": res}))


@app.command()
def methods() -> None:
    """List the methods and their options with defaults."""
    for m in available_methods():
        typer.echo(f"{m}: {json.dumps(method_options(m))}")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
