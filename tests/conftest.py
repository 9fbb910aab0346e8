"""Shared fixtures: real models and real data, all from local files (never the network)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("KERAS_BACKEND", "torch")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# the benchmark experiments some tests run live in bench/ (not part of the library)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


# what a test's source calls when it starts another process
_SPAWNS = ("subprocess", "sys.executable", "CliRunner", "torchrun", "ray.init", "workers=")


def pytest_collection_modifyitems(config, items):
    """Mark every test that starts another process ``subprocess`` (``make test-fast``
    leaves them out with the slow ones), read from the test function's own source."""
    import inspect

    def source(fn) -> str:
        try:
            return inspect.getsource(fn)
        except (OSError, TypeError):
            return ""

    for item in items:
        function = getattr(item, "function", None)
        if function is None:
            continue
        # the test's own source and that of the test module's helpers it calls
        helpers = [
            value
            for name in function.__code__.co_names
            if inspect.isfunction(value := function.__globals__.get(name))
            and value.__module__ == function.__module__
        ]
        if any(word in source(fn) for fn in (function, *helpers) for word in _SPAWNS):
            item.add_marker(pytest.mark.subprocess)


@pytest.fixture
def one_thread():
    """One torch thread for the test: small models gain nothing from a second thread and
    lose much on a shared CPU, and a fixed count keeps runs in two processes bit-identical.
    A test file asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mobilenet_v2_weights():
    from netgraft.data import mobilenet_v2_weights_path

    return mobilenet_v2_weights_path()


@pytest.fixture(scope="session")
def minilm_dir():
    from netgraft.data import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def imagenet_batch():
    """foolbox's 20 real ImageNet images, resized and normalised as torchvision expects,
    with their labels."""
    from PIL import Image
    from torchvision import transforms

    from netgraft.data import IMAGENET_MEAN, IMAGENET_STD, foolbox_images

    tf = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    items = foolbox_images("imagenet")
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in items])
    y = torch.tensor([label for _, label in items])
    return x, y


@pytest.fixture(scope="session")
def digits():
    from netgraft.data import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def mnist5k():
    from netgraft.data import load_mnist5k

    return load_mnist5k()


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the ``netgraft`` entry point in this process: ``cli(*args) -> (code, out, err)``.

    Cheaper than a subprocess (no second torch import); the entry point's own error handling
    (one line, exit code) is what runs.
    """
    from netgraft.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["netgraft", *args])
        with pytest.raises(SystemExit) as info:
            main()
        captured = capsys.readouterr()
        return info.value.code, captured.out, captured.err

    return run
