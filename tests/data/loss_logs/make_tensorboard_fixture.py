"""Writes nvfp4/version_0/events.out.tfevents.* with PyTorch's SummaryWriter (needs `pip install tensorboard`),
the way Lightning's TensorBoardLogger lays it out. Run from this folder; the checked-in file came from it."""

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

TRAIN = {10: 4.0, 20: 3.5, 30: 3.21, 40: 3.0, 50: 2.8, 60: 2.61, 70: 2.5, 80: 2.4, 90: 2.2, 100: 1.98}
VAL = {50: 2.9, 100: 2.08}

out = Path("nvfp4/version_0")
w = SummaryWriter(str(out), filename_suffix="")
for step, loss in TRAIN.items():
    w.add_scalar("train_loss", loss, step, walltime=1_700_000_000 + step)
    w.add_scalar("epoch", step // 60, step, walltime=1_700_000_000 + step)
for step, loss in VAL.items():
    w.add_scalar("val_loss", loss, step, walltime=1_700_000_000 + step)
w.close()
for f in out.glob("events.out.tfevents.*"):  # the name holds time, host and pid: make it neutral
    f.rename(out / "events.out.tfevents.1700000000.fixture.1.0")
