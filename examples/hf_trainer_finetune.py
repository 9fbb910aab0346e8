"""Fine-tune the pretrained MiniLM on real political passages with the Hugging Face
Trainer: classifier first (at learning_rate), then the encoder at a lower rate, with netgraft's
FineTuneCallback; every block's rate shows in the Trainer's logs.

Run: .venv/bin/python examples/hf_trainer_finetune.py   (needs pip install 'netgraft[hf]')
"""

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)

import netgraft
from netgraft.data import load_political_passages, minilm_path
from netgraft.integrations.hf import FineTuneCallback

texts = load_political_passages()  # passages of the 2012 US convention speeches
train_docs = texts.documents % 5 != 0  # split by speech: no speech on both sides
tok = AutoTokenizer.from_pretrained(minilm_path())


def dataset(mask, n):
    idx = mask.nonzero().flatten()[torch.randperm(int(mask.sum()))[:n]].tolist()
    enc = tok([texts.texts[i] for i in idx], padding="max_length", truncation=True,
              max_length=64, return_tensors="pt")  # fmt: skip
    return [
        {**{k: v[j] for k, v in enc.items()}, "labels": texts.labels[i]} for j, i in enumerate(idx)
    ]


torch.manual_seed(0)
train, val = dataset(train_docs, 160), dataset(~train_docs, 96)
model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)

ft = FineTuneCallback(netgraft.FineTuneConfig(head_epochs=1, unfreeze="gradual"))
args = TrainingArguments(
    "hf_finetune_output", num_train_epochs=3, learning_rate=3e-3, per_device_train_batch_size=16,
    logging_steps=5, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
)  # fmt: skip
trainer = Trainer(model, args, train_dataset=train, callbacks=[ft],
                  optimizers=ft.optimizers(model, args))  # every block in the optimizer  # fmt: skip
trainer.train()
for row in trainer.state.log_history[:-1:3]:
    print({k: round(v, 6) for k, v in row.items() if k.startswith(("epoch", "lr/", "loss"))})
preds = trainer.predict(val)
print(
    "validation accuracy:", round(float((preds.predictions.argmax(1) == preds.label_ids).mean()), 3)
)
