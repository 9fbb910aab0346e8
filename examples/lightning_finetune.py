"""Fine-tune the ImageNet MobileNetV2 on real digit images inside PyTorch Lightning:
head first, then one block per epoch from the top, with netgraft's FineTune callback.
Stop it and run it again: it resumes exactly from checkpoints/last.ckpt.

Run: .venv/bin/python examples/lightning_finetune.py   (needs pip install 'netgraft[lightning]')
"""

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import netgraft
from netgraft.data import load_digits, mobilenet_v2_weights_path
from netgraft.integrations.lightning import FineTune

x, y = load_digits()  # 1,797 real 8x8 digits, as 3-channel 32x32 images
x = (F.interpolate(x, size=32, mode="bilinear").repeat(1, 3, 1, 1) - 0.5) / 0.25
train = DataLoader(TensorDataset(x[:400], y[:400]), batch_size=32, shuffle=True)
val = DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=128)

model = torchvision.models.mobilenet_v2()
model.load_state_dict(torch.load(mobilenet_v2_weights_path(), weights_only=True))
netgraft.replace_head(model, num_classes=10)


class Classifier(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self.model(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):  # any optimizer: FineTune regroups it by block
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


ckpt = Path("checkpoints/last.ckpt")
trainer = pl.Trainer(
    max_epochs=4,
    callbacks=[
        # rates logged as lr/<block>
        FineTune(netgraft.FineTuneConfig(head_epochs=1, unfreeze="gradual")),
        pl.callbacks.ModelCheckpoint(dirpath="checkpoints", save_last=True),
    ],
    enable_progress_bar=False,
    logger=False,
)
trainer.fit(Classifier(model), train, val, ckpt_path=ckpt if ckpt.exists() else None)
print("validation accuracy:", round(float(trainer.callback_metrics["val_acc"]), 3))
print("trainable:", netgraft.trainable_report(model))
