"""Train the demo classifier (SGD + OneCycle) on the database split, cached by content hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.devices import current_device
from pipeline.features.backbones import build_model, images_to_tensor

log = logging.getLogger(__name__)


def training_hash(model_spec, train_spec, shard_digests: list[str]) -> str:
    """Content hash of everything that determines the trained weights."""
    payload = json.dumps({"model": model_spec.model_dump(), "train": train_spec.model_dump(),
                          "data": shard_digests}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_classifier(model_spec, train_spec, images: np.ndarray, labels: np.ndarray,
                     out_path: str | os.PathLike, num_threads: int | None = None,
                     log_every: float = 10.0) -> dict:
    """Train on uint8 images [N, H, W, C] and write the state_dict atomically to ``out_path``."""
    if num_threads:
        torch.set_num_threads(num_threads)
    if (labels < 0).any():
        raise ValueError("training needs a label (.cls) for every image")
    torch.manual_seed(train_spec.seed)
    gen = torch.Generator().manual_seed(train_spec.seed)
    device = current_device()  # the GPU Ray assigned this task, if any (pipeline/devices.py)
    model = build_model(model_spec).to(device).to(memory_format=torch.channels_last)
    x_all = images_to_tensor(images)
    y_all = torch.as_tensor(labels)
    steps_per_epoch = int(np.ceil(len(x_all) / train_spec.batch_size))
    opt = torch.optim.SGD(model.parameters(), lr=train_spec.lr, momentum=train_spec.momentum,
                          weight_decay=train_spec.weight_decay, nesterov=train_spec.momentum > 0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train_spec.lr,
                                                total_steps=train_spec.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    history, t0, last_log = [], time.time(), time.time()
    model.train()
    for epoch in range(train_spec.epochs):
        order = torch.randperm(len(x_all), generator=gen)
        correct = seen = 0
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * train_spec.batch_size:(step + 1) * train_spec.batch_size]
            x, y = x_all[idx], y_all[idx]
            if train_spec.hflip:
                flip = torch.rand(len(x), generator=gen) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            x = x.to(device, memory_format=torch.channels_last)
            y = y.to(device)
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if time.time() - last_log > log_every:
                last_log = time.time()
                print(f"train epoch {epoch + 1}/{train_spec.epochs} step {step + 1}/{steps_per_epoch} "
                      f"loss {total_loss / seen:.3f} acc {correct / seen:.3f}", flush=True)
        history.append({"epoch": epoch + 1, "loss": total_loss / seen, "train_acc": correct / seen})
        print(f"train epoch {epoch + 1}/{train_spec.epochs} done: loss {total_loss / seen:.3f} "
              f"acc {correct / seen:.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval().to("cpu")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out_path)
    return {"history": history, "seconds": time.time() - t0, "num_images": len(x_all)}
