"""`netgraft inspect` prints the layer table; bad input is one clear line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NETGRAFT = [str(Path(sys.executable).with_name("netgraft"))]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NETGRAFT, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_inspect_resnet18_prints_table_with_output_shapes():
    result = run("inspect", "torchvision:resnet18", "--input-shape", "3,224,224")
    assert result.returncode == 0, result.stderr
    assert "1×64×112×112" in result.stdout  # conv1's output
    assert "layer4.1.bn2" in result.stdout and "1×1000" in result.stdout
    assert "11,689,512 parameters" in result.stdout


def test_inspect_json_and_blocks(cli):
    code, out, err = cli("inspect", "torchvision:mobilenet_v2", "--blocks", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [b["name"] for b in data["blocks"]][-2:] == ["features.18", "classifier"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["torchvision:resnet81"], "did you mean resnet18"),
        (["nosuchkind:resnet18"], "unknown model spec"),
        (["torchvision:resnet18", "--weights", "missing.safetensors"], "does not exist"),
        (["torchvision:resnet18", "--input-shape", "3,x,224"], "--input-shape"),
    ],
)
def test_bad_input_gives_one_clear_line_and_nonzero_exit(args, expected, cli):
    code, out, err = cli("inspect", *args)
    assert code != 0
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], err


def test_entry_point_process_reports_a_bad_spec_without_traceback():
    result = run("inspect", "torchvision:resnet81")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip() == (
        "netgraft: error: torchvision has no model 'resnet81'; did you mean resnet18, "
        "resnet152, resnet101?"
    )
