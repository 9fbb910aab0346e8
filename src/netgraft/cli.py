"""The ``netgraft`` command line: thin commands over the library, no logic of their own.

Every error a user can cause is printed as one line (``netgraft: error: ...``) with a
non-zero exit code, never a traceback (set ``NETGRAFT_DEBUG=1`` to see one).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import typer
from rich.console import Console

from .errors import NetgraftError

try:  # recent typer vendors its own click; its exceptions are the ones raised
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer uses click itself
    import click

app = typer.Typer(
    name="netgraft",
    help="Reuse trained neural networks without breaking them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Reuse trained neural networks without breaking them."""


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 160)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"3,224,224"`` -> ``(3, 224, 224)``; a clear error for anything else."""
    if text is None:
        return None
    text = text.strip()
    if not re.fullmatch(r"\d+([,x]\d+)*", text) or any(int(p) <= 0 for p in re.split("[,x]", text)):
        raise NetgraftError(
            f"--input-shape must be positive integers like 3,224,224; found {text!r}"
        )
    shape = tuple(int(p) for p in re.split("[,x]", text))
    return shape


def _load(spec: str, weights: Path | None, trust_pickle: bool, task: str | None = None):
    from .zoo import load_model

    return load_model(spec, weights=weights, trust_pickle=trust_pickle, task=task)


@app.command()
def inspect(
    spec: str = typer.Argument(
        ..., help="torchvision:NAME, timm:NAME, hf:PATH, file.py:fn or a saved folder"
    ),
    input_shape: str | None = typer.Option(
        None,
        "--input-shape",
        help="per-example input shape, e.g. 3,224,224 (or a token count for text models)",
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help=".safetensors or .pt/.pth weights file"
    ),
    show_blocks: bool = typer.Option(
        False, "--blocks", help="list the blocks (coarse units) instead of layers"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    task: str | None = typer.Option(
        None, "--task", help="Hugging Face task model, e.g. sequence-classification"
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="allow weights files that need full unpickling"
    ),
) -> None:
    """Print the layer table (execution order and output shapes with --input-shape) or the blocks."""
    from .layers import blocks, layers
    from .zoo import input_for

    model = _load(spec, weights, trust_pickle, task)
    example = None
    shape = parse_shape(input_shape)
    if shape is not None:
        example = input_for(model, shape)
    table = layers(model, example)
    console = _console()
    if show_blocks:
        rows = blocks(model)
        if as_json:
            print(json.dumps({"spec": spec, "blocks": [b.to_dict() for b in rows]}, indent=2))
            return
        from rich.table import Table

        out = Table(title=f"{spec} · {len(rows)} blocks")
        for col in ("#", "block", "params", "modules"):
            out.add_column(col)
        for b in rows:
            mods = ", ".join(b.modules[:6]) + (" …" if len(b.modules) > 6 else "")
            out.add_row(str(b.index), b.name, f"{b.params:,}", mods)
        console.print(out)
        return
    if as_json:
        print(json.dumps({"spec": spec, **table.to_dict()}, indent=2))
        return
    console.print(table.rich_table(title=spec))


def main() -> None:
    """Console entry point: run the app, turning user errors into one line and exit code 1."""
    debug = bool(os.environ.get("NETGRAFT_DEBUG"))
    command = typer.main.get_command(app)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        code = command.main(prog_name="netgraft", standalone_mode=False)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("netgraft: aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("netgraft: interrupted")
        sys.exit(130)
    except NetgraftError as exc:
        if debug:
            raise
        err.print(f"netgraft: error: {exc}", markup=False)
        sys.exit(1)
    except Exception as exc:  # an unexpected failure is still one line for the user
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        err.print(
            f"netgraft: error: {type(exc).__name__}: {first} (set NETGRAFT_DEBUG=1 for a traceback)",
            markup=False,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
