"""The public API's conventions, checked mechanically (docs/notes/api.md states them).

Every name in ``netgraft.__all__`` is listed with its kind, so a new public name is a
deliberate change here. Every public function, constructor and public method must: take at
most 12 parameters (an options object excepted), use one spelling per notion (``after=``,
``out_dir``, ``cache_dir``, ``progress: bool``, ``lr``, ``run=``), default ``seed`` to 0,
and have a docstring. Every deprecated spelling (:data:`netgraft.deprecation.LEGACY`) is
called here once, on real data, and must warn (``DeprecationWarning`` naming the new
spelling) and work.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch

import netgraft
import netgraft.workflows  # noqa: F401  (its old spellings register on import)
from netgraft import models
from netgraft.deprecation import LEGACY

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {
    "function": [
        "adapt_new_blocks", "add_adapters", "attach", "blocks", "cut", "deepen", "evaluate", "expand_adapted", "expand_blocks", "find_head",
        "find_heads", "fine_tune", "fit", "freeze", "frozen_state", "grown_modules", "layers",
        "load", "load_frozen_state", "load_model", "load_tokenizer", "load_weights",
        "param_groups", "predict",
        "pretrain_auxiliary", "pretrain_layerwise", "recipe_of", "reinit", "replace_head",
        "save", "select", "stack_blocks", "study", "suggest", "suggest_adapters", "summary", "train_only",
        "trainable_report",
        "transfer", "truncate", "unfreeze", "verify_equivalence", "widen", "widen_transformer",
    ],
    "options": ["AuxiliaryTask", "FineTuneConfig", "Optimization", "RunOptions"],
    "callback": [
        "AutoRGN", "Callback", "Checkpoint", "EarlyStopping", "Grow", "ReduceLROnPlateau",
    ],
    "result": [
        "AuxiliaryResult", "Block", "FeatureCache", "History", "Layer", "LayerTable",
        "LayerwiseResult", "StudyResult", "Suggestion", "TransferReport",
    ],
    "exception": [
        "CacheError", "DataError", "EquivalenceError", "NetgraftError", "RecipeError",
        "SelectionError", "ShapeMismatchError", "SpecError", "SurgeryError", "WeightsError",
    ],
    "deprecated alias": ["get_recipe"],
}  # fmt: skip

MAX_PARAMETERS = 12
# one spelling per notion: the banned spelling -> the convention's own
BANNED = {
    "at": "after",
    "out": "out_dir",
    "folder": "out_dir (written) or path (read)",
    "dir": "cache_dir or out_dir",
    "output_dir": "out_dir",
    "quiet": "progress",
    "verbose": "progress",
    "print_table": "progress",
    "source_model": "model",
    "target_train": "train",
    "target_val": "val",
    "base_lr": "lr",
    "learning_rate": "lr",
    "device": "run=RunOptions(device=...)",
    "workers": "run=RunOptions(workers=...)",
}
FOLDERS = {"out_dir", "cache_dir", "data_dir"}


def _kind(name: str) -> str:
    """The kind ``name`` is listed under; ``"unlisted"`` for a public name missing from
    :data:`KINDS` (collection goes on, and the listing test below fails naming it)."""
    return next((kind for kind, names in KINDS.items() if name in names), "unlisted")


def _public_callables():
    """(qualified name, callable) for every public function, constructor and public method
    of a public class."""
    for name in netgraft.__all__:
        obj = getattr(netgraft, name)
        if _kind(name) in ("exception", "deprecated alias"):
            continue
        if not inspect.isclass(obj):
            yield name, obj
            continue
        yield f"{name}.__init__", obj
        for attr, member in vars(obj).items():
            if not attr.startswith("_") and inspect.isfunction(member):
                yield f"{name}.{attr}", member


CALLABLES = dict(_public_callables())


def _parameters(fn) -> list[inspect.Parameter]:
    """The parameters a caller names: not ``self``, not ``*args`` and not the catch-all
    ``**kwargs`` through which old spellings (or a function's pass-through arguments)
    arrive."""
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = inspect.signature(fn).parameters.values()
    return [p for p in params if p.name != "self" and p.kind not in skip]


def test_every_public_name_is_listed_with_its_kind():
    listed = [name for names in KINDS.values() for name in names]
    assert sorted(listed) == sorted(set(listed)), "a name is listed under two kinds"
    assert sorted(netgraft.__all__) == sorted(listed)
    for name in KINDS["exception"]:
        assert issubclass(getattr(netgraft, name), netgraft.NetgraftError)
    for name in KINDS["function"]:
        assert inspect.isfunction(getattr(netgraft, name)), name
    for name in KINDS["options"] + KINDS["callback"] + KINDS["result"]:
        assert inspect.isclass(getattr(netgraft, name)), name
    for name in KINDS["callback"]:
        assert issubclass(getattr(netgraft, name), netgraft.Callback), name
    for name in KINDS["deprecated alias"]:
        assert name in LEGACY["<module>"]


# breaks another change is about to mend; strict, so the mend must remove the entry
BEING_MENDED = {
    "FineTuneConfig.__init__": "base_lr is twice the top block's rate: lr (the rate itself, as "
    "fit's lr) is the convention's spelling (issue 21)",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=BEING_MENDED[n]))
        if n in BEING_MENDED
        else n
        for n in sorted(CALLABLES)
    ],
)
def test_public_callable_follows_the_conventions(name):
    fn = CALLABLES[name]
    params = _parameters(fn)
    owner = name.split(".")[0]
    if _kind(owner) != "options":  # an options object is where a long list belongs
        assert len(params) <= MAX_PARAMETERS, f"{name} takes {len(params)} parameters"
    for p in params:
        if _kind(owner) == "options" and p.name in ("device", "workers"):
            continue  # RunOptions is where these live
        assert p.name not in BANNED, f"{name}({p.name}=...): use {BANNED[p.name]}"
        if p.name.endswith("dir") or "folder" in p.name:
            assert p.name in FOLDERS, f"{name}({p.name}=...): folders are {sorted(FOLDERS)}"
        if p.name == "seed" and p.default is not inspect.Parameter.empty:
            assert p.default == 0, f"{name}(seed={p.default!r}): the default seed is 0"
        if p.name == "progress":
            assert p.annotation in (bool, "bool"), f"{name}(progress: {p.annotation})"
        if p.name == "run":
            assert "RunOptions" in str(p.annotation) and p.default is None, name
    assert (inspect.getdoc(fn) or "").strip(), f"{name} has no docstring"


def test_options_objects_follow_the_conventions_too():
    fields = {f.name: f for f in netgraft.RunOptions.__dataclass_fields__.values()}
    assert fields["progress"].default is True and "bool" in str(fields["progress"].type)
    assert {"cache_dir", "resume", "device", "precision", "workers"} <= set(fields)
    assert not set(fields) & set(BANNED) - {"device", "workers"}
    with pytest.raises(TypeError):
        netgraft.RunOptions("cpu")  # keyword-only: a positional value would be ambiguous


def test_deprecated_spellings_are_all_called_below():
    covered: dict[str, set[str]] = {}
    for case in CASES.values():
        for where, names in case[1].items():
            covered.setdefault(where, set()).update(names)
    assert covered == {where: set(names) for where, names in LEGACY.items()}


# ---- every old spelling, called on real data ---------------------------------------------


@pytest.fixture(scope="module")
def data(digits):
    x, y = digits
    return x[:96].reshape(-1, 1, 8, 8).float(), y[:96]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.digits_cnn()


QUIET = netgraft.RunOptions(progress=False, cache=False)
FIT = {"epochs": 1, "lr": 1e-3, "batch_size": 32}


def _fit_run_options(data, tmp_path):
    """fit's old run keywords: each lands in the RunOptions fit runs with."""
    netgraft.fit(_model(), data, callbacks=[netgraft.Checkpoint(tmp_path / "c")], run=QUIET, **FIT)
    model = _model()
    history = netgraft.fit(model, data, device="cpu", precision=None, accumulate=2, quiet=True,
                           resume=tmp_path / "c", stage="again", epochs=2, lr=1e-3)  # fmt: skip
    assert len(history) == 2 and history.rows[-1]["stage"] == "again"  # epoch 1 came from "c"


def _fit_cache_options(data, tmp_path):
    model = _model()
    netgraft.freeze(model, ":dense")
    netgraft.fit(model, data, cache=True, cache_options={"dir": tmp_path}, run=QUIET, **FIT)
    assert any(tmp_path.iterdir())  # the features were kept on disk


def _fit_optimization(data, tmp_path):
    history = netgraft.fit(_model(), data, scheduler="cosine", weight_decay=0.01, lr_mult=10,
                           max_grad_norm=1.0, shuffle=False, run=QUIET, **FIT)  # fmt: skip
    rates = history.rows[0]["lr"]
    assert min(rates.values()) < max(rates.values())  # lr_mult spread the rates
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such'"):
        netgraft.fit(_model(), data, no_such=1, **FIT)
    with pytest.raises(netgraft.NetgraftError, match="lr_mult or layer_decay"):
        netgraft.fit(_model(), data, layer_decay=0.5, lr_mult=2, **FIT)  # both: refused
    netgraft.fit(_model(), data, layer_decay=0.5, run=QUIET, **FIT)


def _study(data, tmp_path):
    x, y = data
    lines: list[str] = []
    result = netgraft.study(
        source_model=_model(), target_train=(x[:64], y[:64]), target_val=(x[64:], y[64:]),
        reuse=[1], modes=("frozen",), baseline=False, seeds=1, budget=1, quiet=True,
        progress=lines.append, num_classes=10, workers=None, backend="local",
        ray_address=None, threads=1, shared_pass=True, cache_dir=tmp_path,
    )  # fmt: skip
    assert [row["k"] for row in result.rows] == [1] and lines and any(tmp_path.iterdir())


def _pretrain(data, tmp_path):
    x, y = data
    pairs = netgraft.pretrain_auxiliary(_model(), (x, y), task="pairs", aux_head="concat",
                                        pairs=64, hidden=8, quiet=True, epochs=1)  # fmt: skip
    assert (pairs.task, pairs.aux_head, pairs.examples) == ("pairs", "concat", 64)
    corrupt = netgraft.pretrain_auxiliary(
        _model(), x, task="corrupt", corruption=netgraft.pretrain.patch_shuffle(2), copies=2,
        redraw=False, aux_head="margin", margin=0.5, epochs=1, run=QUIET,
    )  # fmt: skip
    assert (corrupt.aux_head, corrupt.examples) == ("margin", 2 * len(x))


def _renamed(data, tmp_path):
    x, y = data
    spec = f"{models.__file__}:digits_cnn"
    model = netgraft.load_model(spec)
    netgraft.replace_head(model, num_classes=10, hidden=16)
    assert netgraft.get_recipe(model) is netgraft.recipe_of(model)
    folder = netgraft.save(model, folder=tmp_path / "saved")
    again = netgraft.load(folder=folder)
    assert torch.equal(again(x[:4]), model(x[:4]))
    prefix, suffix = netgraft.cut(model, at="flatten")
    assert torch.allclose(suffix(prefix(x[:4])), model(x[:4]))
    assert netgraft.truncate(model, at="flatten")(x[:4]).shape == (4, 512)
    assert netgraft.Checkpoint(folder=tmp_path / "c").out_dir == tmp_path / "c"
    table = netgraft.summary(model, print_table=False)
    assert [row.name for row in table] == [row.name for row in netgraft.layers(model)]
    history = netgraft.fit(model, data, run=QUIET, **FIT)
    json_path, _ = history.save(folder=tmp_path / "h")
    assert json_path.parent == tmp_path / "h"


def _device(data, tmp_path):
    model = _model()
    assert "acc" in netgraft.evaluate(model, data, device="cpu")
    probs, classes = netgraft.predict(model, data[0][:4], k=3, device="cpu")
    assert probs.shape == classes.shape == (4, 3)
    assert netgraft.suggest(model, data, batches=1, device="cpu").recommended


NET = (
    "from torch import nn\n\n\n"
    "def build():\n"
    "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
    "                         nn.Linear(4 * 8 * 8, 2))\n"
)


def _folders(data, tmp_path):
    """The folder workflows' old names and keywords, on real digit images in class folders."""
    from PIL import Image

    workflows = netgraft.workflows

    x, y = data
    for c in (0, 1):
        (tmp_path / "data" / str(c)).mkdir(parents=True)
        for i in (y == c).nonzero().flatten()[:12].tolist():
            pixels = (x[i, 0].numpy() * 255).clip(0, 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "data" / str(c) / f"{i}.png")
    (tmp_path / "net.py").write_text(NET)
    spec = f"{tmp_path / 'net.py'}:build"
    result = workflows.finetune_folder(spec, tmp_path / "data", out=tmp_path / "ft", size=8,
                                       epochs=1, cache=False, quiet=True, weights=None,
                                       trust_pickle=False)  # fmt: skip
    assert isinstance(result, workflows.FinetuneResult) and result.classes == ["0", "1"]
    pre = workflows.pretrain_folder(spec, tmp_path / "data", out=tmp_path / "pre", task="pairs",
                                    aux_head="concat", pairs=16, copies=1, epochs=1, size=8,
                                    val_fraction=0.5,
                                    quiet=True, weights=None, trust_pickle=False)  # fmt: skip
    assert (pre.folder, pre.details["aux_head"]) == (tmp_path / "pre", "concat")


def _feature_cache(data, tmp_path):
    model = _model()
    netgraft.freeze(model, ":dense")
    prefix, _ = netgraft.cut(model, after="flatten")
    cache = netgraft.FeatureCache(prefix, data, dir=tmp_path)
    assert cache.status == "built" and cache.path.parent == tmp_path
    from netgraft.train.cached import plan

    planned = plan(model, torch.utils.data.TensorDataset(*data), cache=True, dir=tmp_path / "p")
    assert planned is not None and any((tmp_path / "p").iterdir())


def _text_table(data, tmp_path):
    """finetune_table's old run keywords, on four real passages and the bundled MiniLM."""
    pytest.importorskip("transformers")
    from netgraft.data import load_political_passages, minilm_path
    from netgraft.text_workflows import finetune_table

    p = load_political_passages(words=24)
    rows = [(p.texts[i], p.classes[c]) for c in (0, 1) for i in (p.labels == c).nonzero()[:2, 0]]
    table = tmp_path / "t.csv"
    table.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
    config = netgraft.FineTuneConfig(search=False)
    result = finetune_table(f"hf:{minilm_path()}", table, tmp_path / "t", config=config,
                            epochs=0, max_length=8, val_fraction=0.5, cache=False,
                            quiet=True)  # fmt: skip
    assert result.history["stage"] == ["head"] and result.classes == sorted(p.classes)


FIT_RUN = ["device", "precision", "accumulate", "quiet", "resume", "stage"]
FIT_OPT = ["scheduler", "weight_decay", "lr_mult", "max_grad_norm", "shuffle", "layer_decay"]
STUDY = ["source_model", "target_train", "target_val", "quiet", "progress", "num_classes",
         "workers", "backend", "ray_address", "threads", "shared_pass", "cache_dir"]  # fmt: skip
PRETRAIN = ["aux_head", "pairs", "hidden", "quiet", "corruption", "copies", "redraw", "margin"]
CASES = {
    "fit run options": (_fit_run_options, {"fit": FIT_RUN}),
    "fit cache options": (_fit_cache_options, {"fit": ["cache", "cache_options"]}),
    "fit optimization": (_fit_optimization, {"fit": FIT_OPT}),
    "study": (_study, {"study": STUDY}),
    "pretrain_auxiliary": (_pretrain, {"pretrain_auxiliary": PRETRAIN}),
    "renamed": (_renamed, {"<module>": ["get_recipe"], "save": ["folder"], "load": ["folder"],
                           "cut": ["at"], "truncate": ["at"], "Checkpoint": ["folder"],
                           "summary": ["print_table"], "History.save": ["folder"]}),
    "device": (_device, {"evaluate": ["device"], "predict": ["device"], "suggest": ["device"]}),
    "feature cache": (_feature_cache, {"FeatureCache": ["dir"], "plan": ["dir"]}),
    "folders": (_folders, {"<module>": ["finetune_folder"],
                           "fine_tune_folder": ["out", "cache", "quiet", "weights",
                                                "trust_pickle"],
                           "pretrain_folder": ["out", "aux_head", "pairs", "copies", "quiet",
                                               "weights", "trust_pickle"]}),
    "text table": (_text_table, {"finetune_table": ["cache", "quiet"]}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_deprecated_spelling_warns_naming_the_new_one_and_still_works(
    case, data, tmp_path, monkeypatch
):
    call, spellings = CASES[case]
    monkeypatch.setattr("netgraft.deprecation._warned", set())  # each warns once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(data, tmp_path)
    said = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    for where, names in spellings.items():
        for old in names:
            if where == "<module>":
                new = LEGACY[where][old]
                assert any(f"{old}() is deprecated; use {new}()" in m for m in said), old
            else:
                shown = [m for m in said if m.startswith(f"{where}({old}=...) is deprecated")]
                assert shown, f"{where}({old}=...) did not warn"
                assert f"use {LEGACY[where][old].split('=')[0]}" in shown[0], shown[0]
    # no other old keyword: netgraft's own calls inside these use the new spellings
    called = tuple(f"{where}({old}=...) is" for where, names in spellings.items() for old in names)
    keywords = [m for m in said if re.match(r"[\w.]+\(\w+=\.\.\.\) is deprecated; use", m)]
    others = [m for m in keywords if not m.startswith(called)]
    assert not others, f"netgraft passed old keywords to itself: {others}"
    # each warning points at the caller's line, not at netgraft's own code
    src = str(Path(netgraft.__file__).parent)
    ours = [w for w in caught if "is deprecated" in str(w.message)]
    assert ours and not [w for w in ours if str(w.filename).startswith(src)]
