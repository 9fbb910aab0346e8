"""One process of the Lightning DDP test (tests/test_faults.py), started with
``python -m torch.distributed.run --nproc_per_node 2 --standalone
tests/lightning_ddp_worker.py OUT STRATEGY``; not a test module itself.

Three fits of a LightningModule holding the digits MLP (float64) under Lightning's DDP on
two CPU processes (gloo), each with ``FineTune(unfreeze="gradual")`` over 4 epochs: the
uninterrupted run (``whole``), a run stopped after epoch 2 of the schedule (``stop``) and
its continuation from Lightning's ``last.ckpt`` (``resume``). Each writes
``OUT/<run>_rank<r>.pt``: the final weights and, per epoch, the trainable parameter names.
Last, a fit under plain ``ddp`` records FineTune's error (``refused``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402
from netgraft.errors import NetgraftError  # noqa: E402
from netgraft.integrations.lightning import FineTune  # noqa: E402

EPOCHS = 4
STOP_AFTER = 1  # 0-based epoch after which the stopped run ends (mid-schedule)


class Lit(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = ddp_worker.make_model()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class Record(pl.Callback):
    """The trainable parameter names at the start of each epoch (after FineTune's)."""

    def __init__(self):
        self.trainable = {}

    def on_train_epoch_start(self, trainer, pl_module):
        names = [n for n, p in pl_module.net.named_parameters() if p.requires_grad]
        self.trainable[trainer.current_epoch] = names


class StopAfter(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == STOP_AFTER:
            trainer.should_stop = True


def run(out: Path, strategy: str, name: str) -> None:
    pl.seed_everything(0, workers=True)
    lit, record = Lit(), Record()
    callbacks = [FineTune(head="5", head_epochs=1, unfreeze="gradual"), record]
    ckpt_path = None
    if name in ("stop", "resume"):
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_last=True))
    if name == "stop":
        callbacks.append(StopAfter())
    if name == "resume":
        ckpt_path = str(out / "ckpt" / "last.ckpt")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=EPOCHS, precision="64-true",
        callbacks=callbacks, logger=False, enable_progress_bar=False, default_root_dir=out,
        enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    loader = DataLoader(ddp_worker.digits(), batch_size=64, shuffle=True)
    trainer.fit(lit, loader, ckpt_path=ckpt_path)
    result = {"state": lit.net.state_dict(), "trainable": record.trainable}
    torch.save(result, out / f"{name}_rank{trainer.global_rank}.pt")


def refused(out: Path) -> None:
    """Plain ``ddp`` (no search for unused parameters): FineTune's error, before training."""
    try:
        run(out, "ddp", "refused")
    except NetgraftError as exc:
        torch.save({"error": str(exc)}, out / f"refused_rank{os.environ['RANK']}.pt")


def main() -> None:
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    for name in ("whole", "stop", "resume"):
        run(out, strategy, name)
    refused(out)


if __name__ == "__main__":
    main()
