"""PyTorch training of the model's module: warm start, early stopping, determinism.

The published artefact is a ``ScoringModule``: raw inputs in, the task's answer out
(probability, class probabilities, value), with the imputation, clipping and standardisation
of ``prepare.Standardisation`` baked in as buffers, so Triton (and anyone else) feeds it raw
values. Training itself runs on the standardised matrix, minimising the task's loss: log loss
(binary), cross-entropy (multiclass) or squared error on the standardised target
(regression). The same seed and data give the same weights (fixed initialisation
and shuffling generators, deterministic algorithms).

With ``processes > 1`` the fit runs under torchrun with DistributedDataParallel
(``loopmesh.trainer.ddp``): one process per GPU (NCCL), or gloo on CPU. The module is
published as ONNX with its weights beside it (``loopmesh.trainer.export``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from loopmesh.mesh import model_repo
from loopmesh.mesh.events import Task
from loopmesh.trainer.export import OnnxScoring, load_weights
from loopmesh.trainer.plan import ModelPlan
from loopmesh.trainer.prepare import Standardisation
from loopmesh.trainer.scoring import MLP, ScoringModule
from loopmesh.trainer.settings import TrainingSettings

log = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float64]
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WarmStart:
    """Weights of the stable version and the standardisation they were trained under."""

    state: StateDict
    standardisation: Standardisation
    target: tuple[float, float] = (0.0, 1.0)
    """(mean, std) of a regression target the weights were trained on."""


@dataclass(frozen=True)
class FitResult:
    module: ScoringModule
    epochs: int
    best_epoch: int
    validation_log_loss: float
    """The best validation loss of the task (log loss for a binary model)."""
    warm_started: bool
    device: str
    seconds: float


FitFn = Callable[..., FitResult]


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def new_mlp(n_features: int, config: TrainingSettings) -> MLP:
    """A freshly initialised MLP; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return MLP(n_features, list(config.hidden))


FIRST_LAYERS = ("net.0", "mlp.net.0")
"""The built-in modules' first linear layer (MLP, EmbeddingMLP): where a warm start folds the
change of standardisation. Other modules start fresh each run."""


def new_module(plan: ModelPlan, n_features: int, config: TrainingSettings) -> nn.Module:
    """A freshly initialised module of ``plan``; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return plan.build(n_features, config.hidden)


def adapt_warm_state(warm: WarmStart, target: Standardisation, mlp: nn.Module) -> StateDict | None:
    """The stable weights re-expressed for ``target``'s standardisation, or None if unusable.

    Inputs are standardised differently in each version; folding the change into the first
    layer (W' = W * s_new / s_old, b' = b + W (m_new - m_old) / s_old, on the numeric columns)
    keeps the warm model's function unchanged, so training starts from what the stable version
    actually predicts.
    """
    own = mlp.state_dict()
    if warm.standardisation.feature_names != target.feature_names:
        return None
    if set(own) != set(warm.state) or any(own[k].shape != warm.state[k].shape for k in own):
        return None
    first = next((name for name in FIRST_LAYERS if f"{name}.weight" in own), None)
    if first is None:
        return None
    state = {k: v.detach().to(torch.float32).clone() for k, v in warm.state.items()}
    n = len(target.feature_names)
    s_old = torch.as_tensor(warm.standardisation.std, dtype=torch.float32)
    m_old = torch.as_tensor(warm.standardisation.mean, dtype=torch.float32)
    s_new = torch.as_tensor(target.std, dtype=torch.float32)
    m_new = torch.as_tensor(target.mean, dtype=torch.float32)
    weight, bias = state[f"{first}.weight"], state[f"{first}.bias"]
    numeric = weight[:, :n]
    state[f"{first}.bias"] = bias + numeric @ ((m_new - m_old) / s_old)
    state[f"{first}.weight"] = torch.cat([numeric * (s_new / s_old), weight[:, n:]], dim=1)
    return state


def _loss(task: Task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The task's training loss on the module's raw output and the (prepared) targets."""
    if task == "multiclass":
        cross_entropy = nn.CrossEntropyLoss()
        return lambda raw, y: cross_entropy(raw, y.reshape(-1).long())
    if task == "regression":
        squared = nn.MSELoss()
        return lambda raw, y: squared(raw.reshape(-1, 1), y)
    logistic = nn.BCEWithLogitsLoss()
    return lambda raw, y: logistic(raw.reshape(-1, 1), y)


def _categorical(x: FloatArray, n: int, plan: ModelPlan) -> npt.NDArray[np.int64] | None:
    if not plan.categorical:
        return None
    codes = np.nan_to_num(x[:, n:], nan=0.0).astype(np.int64)
    return np.clip(codes, 0, np.asarray(plan.cardinalities) - 1)


def fit(
    x_train: FloatArray,
    y_train: FloatArray,
    x_val: FloatArray,
    y_val: FloatArray,
    standardisation: Standardisation,
    config: TrainingSettings,
    *,
    warm: WarmStart | None = None,
    plan: ModelPlan | None = None,
) -> FitResult:
    """Train on raw rows (numeric inputs, then categorical rows); early-stop on the
    validation rows; return the best module (CPU)."""
    t0 = time.perf_counter()
    plan = plan or ModelPlan()
    n = len(standardisation.feature_names)
    mlp = new_module(plan, n, config)
    warm_state = adapt_warm_state(warm, standardisation, mlp) if warm is not None else None
    if warm_state is not None:
        mlp.load_state_dict(warm_state)
    target = (0.0, 1.0)
    if plan.task == "regression":
        # Trained on a standardised target; a warm start keeps the units its weights know.
        spread = float(np.std(y_train))
        fitted = (float(np.mean(y_train)), spread if spread > 1e-9 else 1.0)
        target = warm.target if warm_state is not None and warm is not None else fitted
    y_fit = (y_train - target[0]) / target[1]
    y_check = (y_val - target[0]) / target[1]
    z_train = standardisation.transform(x_train[:, :n])
    z_val = standardisation.transform(x_val[:, :n])
    if config.processes > 1:
        if plan.task != "binary" or plan.categorical or not isinstance(mlp, MLP):
            raise ValueError(
                "training.processes > 1 (DDP) trains the built-in binary MLP only; "
                "set processes to 1 for this model"
            )
        from loopmesh.trainer.ddp import fit_distributed

        state, epochs, best_epoch, best = fit_distributed(
            mlp, z_train, y_fit, z_val, y_check, config
        )
        mlp.load_state_dict(state)
        device = f"ddp x{config.processes}"
    else:
        device_t = resolve_device(config.device)
        generator = torch.Generator().manual_seed(config.seed)
        rows = len(z_train)

        def batches(epoch: int) -> Iterable[torch.Tensor]:
            order = torch.randperm(rows, generator=generator)
            return torch.split(order, config.batch_size)

        # The thread count is process-wide: set it for the fit only.
        threads = torch.get_num_threads()
        if config.threads:
            torch.set_num_threads(config.threads)
        try:
            epochs, best_epoch, best = train_epochs(
                mlp,
                z_train,
                y_fit,
                z_val,
                y_check,
                config,
                device_t,
                batches,
                task=plan.task,
                categorical_train=_categorical(x_train, n, plan),
                categorical_val=_categorical(x_val, n, plan),
            )
        finally:
            torch.set_num_threads(threads)
        mlp.to("cpu")
        device = str(device_t)
    module = ScoringModule(
        mlp,
        standardisation,
        task=plan.task,
        cardinalities=plan.cardinalities,
        target_mean=target[0],
        target_std=target[1],
    ).eval()
    return FitResult(
        module=module,
        epochs=epochs,
        best_epoch=best_epoch,
        validation_log_loss=best,
        warm_started=warm_state is not None,
        device=device,
        seconds=time.perf_counter() - t0,
    )


def train_epochs(
    model: nn.Module,
    z_train: FloatArray,
    y_train: FloatArray,
    z_val: FloatArray,
    y_val: FloatArray,
    config: TrainingSettings,
    device: torch.device,
    batches: Callable[[int], Iterable[torch.Tensor]],
    *,
    task: Task = "binary",
    categorical_train: npt.NDArray[np.int64] | None = None,
    categorical_val: npt.NDArray[np.int64] | None = None,
) -> tuple[int, int, float]:
    """Adam with early stopping; ``model`` ends with its best weights. Shared with DDP.

    Returns (epochs run, best epoch, best validation loss of the task); epoch 0 is the
    starting point, so a warm start that training cannot improve is kept as it was.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train_epochs(
            model,
            (z_train, categorical_train),
            y_train,
            (z_val, categorical_val),
            y_val,
            config,
            device,
            batches,
            _loss(task),
        )
    finally:
        torch.use_deterministic_algorithms(deterministic)


Inputs = tuple[FloatArray, npt.NDArray[np.int64] | None]


def _train_epochs(
    model: nn.Module,
    train: Inputs,
    y_train: FloatArray,
    val: Inputs,
    y_val: FloatArray,
    config: TrainingSettings,
    device: torch.device,
    batches: Callable[[int], Iterable[torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[int, int, float]:
    model.to(device)

    def tensors(inputs: Inputs) -> list[torch.Tensor]:
        z, categorical = inputs
        out = [torch.as_tensor(z, dtype=torch.float32, device=device)]
        if categorical is not None:
            out.append(torch.as_tensor(categorical, dtype=torch.int64, device=device))
        return out

    xt, xv = tensors(train), tensors(val)
    yt = torch.as_tensor(y_train, dtype=torch.float32, device=device).reshape(-1, 1)
    yv = torch.as_tensor(y_val, dtype=torch.float32, device=device).reshape(-1, 1)
    optimiser = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )

    def validation_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(loss_fn(model(*xv), yv))

    best = validation_loss()
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best_epoch, stale, epoch = 0, 0, 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        for index in batches(epoch):
            index = index.to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(*(t[index] for t in xt)), yt[index])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
        current = validation_loss()
        if not math.isfinite(current):
            raise FloatingPointError(f"validation loss became {current} at epoch {epoch}")
        if current < best - 1e-6:
            best, best_epoch, stale = current, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return epoch, best_epoch, best


def predict(module: Callable[[torch.Tensor], torch.Tensor], x: FloatArray) -> FloatArray:
    """The answers for raw rows ``x`` (a ScoringModule, or a published model.onnx loaded by
    ``load_scoring``): ``[n]`` probabilities or values, or ``[n, k]`` class probabilities."""
    with torch.inference_mode():
        out = module(torch.as_tensor(x, dtype=torch.float32))
    if out.dim() == 2 and out.shape[1] > 1:
        return np.asarray(out.to(torch.float64).numpy())
    return np.asarray(out.reshape(-1).to(torch.float64).numpy())


def load_scoring(path: Path) -> OnnxScoring:
    """A published model.onnx, run by onnxruntime on the CPU as Triton runs it."""
    return OnnxScoring(path)


def warm_start_from(path: Path, standardisation: Standardisation) -> WarmStart | None:
    """The MLP weights published beside ``path`` (a version's model.onnx) in
    weights.safetensors, sha256-checked against its metadata.json, with the standardisation
    they expect; None if the version has no weights (nothing to start from)."""
    vdir = Path(path).parent
    meta = json.loads((vdir / model_repo.METADATA_FILE).read_text())
    expected = meta.get("weights_sha256")
    if expected is None:
        return None
    state = load_weights(vdir / model_repo.WEIGHTS_FILE, expected)
    prefix = "mlp."
    mlp_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    target = meta.get("target") or {}
    return WarmStart(
        state=mlp_state,
        standardisation=standardisation,
        target=(float(target.get("mean", 0.0)), float(target.get("std", 1.0))),
    )
