"""``netgraft finetune`` on a text table: real convention-speech passages as a CSV and a
JSONL file fine-tune the pretrained MiniLM through the CLI (tokenizer from the model's
folder, fixed length), ``evaluate`` and ``predict`` read the same formats, and bad tables are
one clear error with nothing written."""

from __future__ import annotations

import csv
import json

import pytest

from netgraft.data import load_political_passages, read_text_table
from netgraft.errors import DataError

pytest.importorskip("transformers")


def _rows(start: int, per_class: int) -> list[dict[str, str]]:
    """Real passages, ``per_class`` of each party from the ``start``-th on, labelled by name."""
    p = load_political_passages(words=24)
    rows = []
    for label, name in enumerate(p.classes):
        idx = (p.labels == label).nonzero().flatten()[start : start + per_class].tolist()
        rows += [{"text": p.texts[i], "label": name} for i in idx]
    return rows


def _write_csv(path, rows, fields=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_finetune_evaluate_and_predict_a_text_table(cli, minilm_dir, tmp_path):
    train = _write_csv(tmp_path / "train.csv", _rows(0, 12))
    held = _write_jsonl(tmp_path / "held.jsonl", _rows(100, 4))
    out = tmp_path / "model"
    code, stdout, err = cli(
        "finetune", f"hf:{minilm_dir}", "--data", str(train), "-o", str(out), "--epochs", "1",
        "--max-length", "32", "--batch-size", "8", "--quiet",
    )  # fmt: skip
    assert code in (0, None), err
    assert "fine-tuned 2 epochs" in stdout
    info = json.loads((out / "data.json").read_text())
    assert info["classes"] == ["democrat", "republican"] and info["text"]["max_length"] == 32
    code, stdout, err = cli("evaluate", str(out), "--data", str(held), "--json")
    assert code in (0, None), err
    scores = json.loads(stdout)
    assert scores["n"] == 8 and 0 <= scores["acc"] <= 1
    code, stdout, err = cli("predict", str(out), str(held), "--json", "-k", "2")
    assert code in (0, None), err
    predicted = json.loads(stdout)
    assert list(predicted) == [f"{held}:{i}" for i in range(1, 9)]
    top = predicted[f"{held}:1"]
    assert {t["class"] for t in top} == {"democrat", "republican"}
    assert sum(t["prob"] for t in top) == pytest.approx(1, abs=1e-5)
    unknown = _write_csv(tmp_path / "unknown.csv", [{"text": "a speech", "label": "green"}])
    code, _, err = cli("evaluate", str(out), "--data", str(unknown))
    assert code == 1 and "['green']" in err


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: _write_csv(p / "t.csv", _rows(0, 3), ("text",)), "no 'label' column"),
        (lambda p: _write_csv(p / "t.csv", [], ("text", "label")), "is empty"),
        (lambda p: _write_jsonl(p / "t.jsonl", []), "is empty"),
        (lambda p: _write_jsonl(p / "t.jsonl", [{"body": "x", "label": "a"}]), "no 'text' column"),
    ],
)
def test_a_bad_table_is_one_error_and_writes_nothing(cli, minilm_dir, tmp_path, write, message):
    table = write(tmp_path)
    out = tmp_path / "model"
    code, _, err = cli("finetune", f"hf:{minilm_dir}", "--data", str(table), "-o", str(out))
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_labels_that_do_not_match_the_head_are_one_error(cli, minilm_dir, tmp_path):
    table = _write_csv(tmp_path / "t.csv", _rows(0, 3))
    out = tmp_path / "model"
    code, _, err = cli(
        "finetune", f"hf:{minilm_dir}", "--data", str(table), "-o", str(out), "--num-classes", "3"
    )
    assert code == 1 and "does not match the 2 labels" in err and not out.exists()
    code, _, err = cli("finetune", "torchvision:resnet18", "--data", str(table), "-o", str(out))
    assert code == 1 and "hf:PATH" in err and not out.exists()


def test_jsonl_labels_may_be_numbers_and_predict_tables_need_no_label(tmp_path):
    rows = [{"text": "a b", "label": 1}, {"text": "c", "label": 0, "extra": True}]
    assert read_text_table(_write_jsonl(tmp_path / "t.jsonl", rows)) == (["a b", "c"], ["1", "0"])
    unlabelled = _write_csv(tmp_path / "u.csv", [{"text": "x"}], ("text",))
    assert read_text_table(unlabelled, need_labels=False) == (["x"], None)
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": "a"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        read_text_table(tmp_path / "bad.jsonl")
