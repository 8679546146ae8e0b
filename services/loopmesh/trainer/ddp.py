"""Multi-process training with DistributedDataParallel, launched under torchrun.

``fit_distributed`` (called by ``train.fit`` when ``training.processes > 1``) writes the
standardised arrays (``.npy``, read back without pickle) and the initial weights to a temp
directory and runs::

    python -m torch.distributed.run --standalone --nproc_per_node=<processes> \\
        -m loopmesh.trainer.ddp <workdir>

Each process takes one GPU (``LOCAL_RANK``, NCCL backend) or, without CUDA, runs on the CPU
with gloo. Every rank trains on its shard (DistributedSampler) and evaluates the full
validation set with the same synchronised weights, so all ranks take the same early-stopping
decision without extra communication. Rank 0 saves the best weights as a plain tensor
state dict, which the parent loads with ``weights_only=True``.

On one machine with N GPUs: ``LOOPMESH_TRAINER__TRAINING__PROCESSES=N``. Across machines,
run this module under torchrun yourself with ``--nnodes`` and a rendezvous endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from loopmesh.trainer.scoring import MLP
from loopmesh.trainer.settings import TrainingSettings
from loopmesh.trainer.train import StateDict, new_mlp, resolve_device, train_epochs

FloatArray = npt.NDArray[np.float64]
_ARRAYS = ("z_train", "y_train", "z_val", "y_val")


def fit_distributed(
    mlp: MLP,
    z_train: FloatArray,
    y_train: FloatArray,
    z_val: FloatArray,
    y_val: FloatArray,
    config: TrainingSettings,
    *,
    timeout: float = 3600.0,
) -> tuple[StateDict, int, int, float]:
    """Run the DDP fit in ``config.processes`` processes; (best state, epochs, best epoch, loss)."""
    with tempfile.TemporaryDirectory(prefix="loopmesh-ddp-") as tmp:
        work = Path(tmp)
        for name, array in zip(_ARRAYS, (z_train, y_train, z_val, y_val), strict=True):
            np.save(work / f"{name}.npy", np.ascontiguousarray(array, dtype=np.float64))
        torch.save(mlp.state_dict(), work / "initial.pt")
        (work / "config.json").write_text(config.model_dump_json())
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={config.processes}",
            "-m",
            "loopmesh.trainer.ddp",
            str(work),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun failed ({done.returncode}): {done.stderr[-2000:]}")
        state = torch.load(work / "best.pt", map_location="cpu", weights_only=True)
        summary = json.loads((work / "summary.json").read_text())
    return state, int(summary["epochs"]), int(summary["best_epoch"]), float(summary["best"])


def _worker(work: Path) -> None:
    config = TrainingSettings.model_validate_json((work / "config.json").read_text())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        rank = dist.get_rank()
        arrays = {n: np.load(work / f"{n}.npy", allow_pickle=False) for n in _ARRAYS}
        mlp = new_mlp(arrays["z_train"].shape[1], config)
        mlp.load_state_dict(torch.load(work / "initial.pt", map_location="cpu", weights_only=True))
        mlp.to(device)
        model = DistributedDataParallel(
            mlp, device_ids=[local_rank] if device.type == "cuda" else None
        )
        rows: Any = range(len(arrays["z_train"]))  # any Sized works; no Dataset needed
        sampler: DistributedSampler[int] = DistributedSampler(
            rows, shuffle=True, seed=config.seed, drop_last=False
        )

        def batches(epoch: int) -> Iterable[torch.Tensor]:
            sampler.set_epoch(epoch)
            return torch.split(torch.tensor(list(sampler), dtype=torch.long), config.batch_size)

        epochs, best_epoch, best = train_epochs(
            model,
            arrays["z_train"],
            arrays["y_train"],
            arrays["z_val"],
            arrays["y_val"],
            config,
            device,
            batches,
        )
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in mlp.state_dict().items()}
            torch.save(state, work / "best.pt")
            summary = {"epochs": epochs, "best_epoch": best_epoch, "best": best}
            (work / "summary.json").write_text(json.dumps(summary))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
