"""The trainer follows the model's spec: its task, its inputs (numeric and categorical), its
module factory; a spec it cannot train stops it at start, naming the file and field.

Each run here is the real pipeline on examples stored in a real dataset: fit, holdout gate
against the constant baseline, ONNX export checked in onnxruntime, the metadata Predict reads.
"""

from __future__ import annotations

import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from loopmesh.mesh import model_repo
from loopmesh.mesh.events import LabelledExample, Task
from loopmesh.mesh.model_spec import ContextField, SpecError
from loopmesh.trainer.dataset import Dataset
from loopmesh.trainer.pipeline import load_stable, publish_files, run_pipeline
from loopmesh.trainer.plan import ModelPlan
from loopmesh.trainer.settings import TrainerScope, TrainerSettings, TrainingSettings
from loopmesh.trainer.train import fit, load_scoring, predict

T0 = datetime(2026, 3, 1, tzinfo=UTC)
FAST = TrainingSettings(max_epochs=60, patience=6, hidden=[16])
SHOP = ContextField(name="shop", kind="categorical", buckets=64)
CHANNEL = ContextField(name="channel", kind="categorical", vocabulary=("web", "app"))
SHOPS = [f"shop-{i}" for i in range(12)]
CHANNELS = ["web", "app", "tv"]  # "tv" is out of the vocabulary: row 0


def _examples(
    model: str, task: Task, n: int, seed: int
) -> tuple[list[LabelledExample], np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    shops = [SHOPS[i] for i in rng.integers(0, len(SHOPS), size=n)]
    channels = [CHANNELS[i] for i in rng.integers(0, len(CHANNELS), size=n)]
    # Each shop moves the target by its own amount: only an embedding of it can learn that.
    shop_effect = np.linspace(-2.0, 2.0, len(SHOPS))[[SHOPS.index(s) for s in shops]]
    channel_effect = np.array([{"web": 0.5, "app": -0.5, "tv": 0.0}[c] for c in channels])
    signal = 1.5 * x[:, 0] - x[:, 1] + shop_effect + channel_effect
    if task == "regression":
        target = 20.0 + 3.0 * signal + rng.normal(scale=0.3, size=n)
    else:  # three classes by the signal's tercile
        target = np.digitize(signal, np.quantile(signal, [1 / 3, 2 / 3])).astype(float)
    out = [
        LabelledExample(
            prediction_id=f"{model}-{i}",
            entity_id=f"e{i % 50}",
            model_name=model,
            model_version=1,
            features={"x0": float(x[i, 0]), "x1": float(x[i, 1])},
            categorical={"shop": shops[i], "channel": channels[i]},
            task=task,
            target=float(target[i]),
            score=0.0,
            predicted_at=T0 + timedelta(seconds=i),
            feedback_at=T0 + timedelta(seconds=i),
        )
        for i in range(n)
    ]
    return out, target, shops, channels


def _plan(task: Task) -> ModelPlan:
    return ModelPlan(
        task=task,
        classes=3 if task == "multiclass" else None,
        numeric=("x0", "x1"),
        categorical=(SHOP, CHANNEL),
        source="models/test.yaml",
    )


@pytest.mark.parametrize("task", ["regression", "multiclass"])
def test_a_non_binary_model_with_categorical_inputs_trains_gates_and_exports(
    task: Task, tmp_path: Path
) -> None:
    model = f"t-{task}"
    scope = TrainerScope(model_name=model, data_dir=tmp_path / "data", training=FAST)
    ds = Dataset(scope.data_dir)
    examples, target, shops, channels = _examples(model, task, 3000, seed=1)
    ds.append(examples)
    plan = _plan(task)

    outcome = run_pipeline(scope, ds, None, fit, run_id="r1", plan=plan)

    decision = outcome.decision
    assert decision.accepted, decision.reason
    assert decision.reference_kind == "baseline"
    cand, ref = decision.candidate.as_dict(), decision.reference.as_dict()
    if task == "regression":
        # Far better than the mean: the shop effects were learned through the embedding.
        assert cand["loss"] < 0.1 * ref["loss"]
        assert cand["mae"] < 1.0
    else:
        assert cand["accuracy"] > 0.8 > ref["accuracy"]
    meta = outcome.metadata
    assert meta["task"] == task and meta["feature_names"] == ["x0", "x1"]
    assert [c["name"] for c in meta["categorical"]] == ["shop", "channel"]
    assert ("classes" in meta) == (task == "multiclass")
    assert ("target" in meta) == (task == "regression")

    # Published, the ONNX graph gives what the gateway would get for an encoded row.
    repo = tmp_path / "repo"
    assert outcome.payload is not None
    version, _ = publish_files(repo, model, outcome.payload, outcome.metadata)
    stable = load_stable(repo, model, version)
    assert stable is not None and stable.categorical == (SHOP, CHANNEL)
    served = model_repo.read_metadata(repo, model, version)
    assert served["n_features"] == 4
    assert served["n_outputs"] == (3 if task == "multiclass" else 1)
    rows = np.column_stack(
        [
            [e.features["x0"] for e in examples[-200:]],
            [e.features["x1"] for e in examples[-200:]],
            [SHOP.index(s) for s in shops[-200:]],
            [CHANNEL.index(c) for c in channels[-200:]],
        ]
    ).astype(float)
    answers = predict(load_scoring(stable.path), rows)
    if task == "regression":
        assert answers.shape == (200,)
        assert np.mean(np.abs(answers - target[-200:])) < 1.0  # in the target's own units
    else:
        assert answers.shape == (200, 3)
        np.testing.assert_allclose(answers.sum(axis=1), 1.0, atol=1e-5)
        assert np.mean(np.argmax(answers, axis=1) == target[-200:]) > 0.8

    # A second run warm-starts from it and is judged against it on the same holdout.
    more, *_ = _examples(model, task, 1000, seed=2)
    ds.append([e.model_copy(update={"prediction_id": "b" + e.prediction_id}) for e in more])
    second = run_pipeline(scope, ds, stable, fit, run_id="r2", plan=plan)
    assert second.warm_started and second.decision.reference_kind == "stable"


def _project(tmp_path: Path, spec: str, module: str) -> Path:
    """A project with its spec and its own torch module beside it (the Feast definitions a
    real project has are not read by the trainer)."""
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "m.yaml").write_text(textwrap.dedent(spec))
    (project / "shop_models.py").write_text(textwrap.dedent(module))
    return project


def _trainer(project: Path, tmp_path: Path) -> object:
    from loopmesh.trainer.app import TrainerApp

    settings = TrainerSettings(
        project=project,
        model_repository=tmp_path / "repo",
        trainer={"model_name": "m", "data_dir": tmp_path / "data"},  # type: ignore[arg-type]
    )
    return TrainerApp(settings)


SPEC = """\
    name: m
    task: regression
    inputs:
      features: ["stats:x0"]
      context:
        - {{name: shop, kind: categorical, buckets: 8}}
    label: {{source: value}}
    module: {{factory: "{factory}"}}
"""


async def test_a_spec_names_the_users_module_and_a_bad_one_stops_the_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The trainer puts the project on the import path; the test takes it off afterwards.
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "shop_models", raising=False)
    module = """\
        import torch
        from torch import nn

        class Good(nn.Module):
            def __init__(self, n_inputs, n_outputs, cardinalities):
                super().__init__()
                self.shop = nn.Embedding(cardinalities[0], 4)
                self.out = nn.Linear(n_inputs + 4, n_outputs)

            def forward(self, z, categorical):
                return self.out(torch.cat([z, self.shop(categorical[:, 0])], dim=1))

        class Branchy(Good):
            def forward(self, z, categorical):
                if float(z.sum()) > 0:  # data-dependent Python control flow
                    return self.out(torch.cat([z, self.shop(categorical[:, 0])], dim=1))
                return -self.out(torch.cat([z, self.shop(categorical[:, 0])], dim=1))

        def good(n_inputs, n_outputs, cardinalities):
            return Good(n_inputs, n_outputs, cardinalities)

        def branchy(n_inputs, n_outputs, cardinalities):
            return Branchy(n_inputs, n_outputs, cardinalities)

        def not_a_module(n_inputs, n_outputs, cardinalities):
            return "a string"
    """
    good = _project(tmp_path / "a", SPEC.format(factory="shop_models:good"), module)
    app = _trainer(good, tmp_path / "a")
    plan = app.plan  # type: ignore[attr-defined]
    assert (plan.task, plan.numeric, plan.cardinalities) == ("regression", ("stats:x0",), [8])

    cases = {
        "shop_models:branchy": "cannot be exported",
        "shop_models:not_a_module": "not a torch.nn.Module",
        "shop_models:missing": "has no callable 'missing'",
        "no_such_package.models:mlp": "cannot import 'no_such_package.models'",
    }
    for factory, reason in cases.items():
        where = tmp_path / factory.replace(":", "_")
        project = _project(where, SPEC.format(factory=factory), module)
        with pytest.raises(SpecError, match=reason) as caught:
            _trainer(project, where)
        assert caught.value.field == "models/m.yaml: module.factory"


def test_a_specs_training_gate_and_trigger_sections_apply_to_its_model() -> None:
    from loopmesh.mesh.model_spec import parse
    from loopmesh.trainer.plan import plan_of

    text = """\
name: m
task: regression
inputs: {context: [{name: x}]}
label: {source: value}
training: {max_epochs: 7}
gate: {min_loss_improvement: 0.5}
triggers: {drift_detector: page_hinkley, drift_ph_threshold: 1.5}
"""
    _, scope = plan_of(parse(text, "models/m.yaml"), "models/m.yaml", TrainerScope(model_name="m"))
    assert scope.training.max_epochs == 7 and scope.training.patience == 8  # the rest: defaults
    assert scope.gate.min_loss_improvement == 0.5
    assert (scope.triggers.drift_detector, scope.triggers.drift_ph_threshold) == (
        "page_hinkley",
        1.5,
    )
    bad = parse(text.replace("page_hinkley", "cusum"), "models/m.yaml")
    with pytest.raises(SpecError) as caught:
        plan_of(bad, "models/m.yaml", TrainerScope(model_name="m"))
    assert caught.value.field == "models/m.yaml: triggers.drift_detector"


def test_an_accepted_candidate_preempts_a_canary_it_beats_on_the_same_rows(
    tmp_path: Path,
) -> None:
    """Issue 22, latest wins: the trainer judges the candidate against the version in canary
    too, on the same holdout rows, and says so in the metadata ModelPublished carries."""
    model = "t-preempt"
    gate = {"min_loss_improvement": 1.0}  # in the target's units (squared minutes)
    scope = TrainerScope(model_name=model, data_dir=tmp_path / "data", training=FAST, gate=gate)
    ds = Dataset(scope.data_dir)
    examples, *_ = _examples(model, "regression", 3000, seed=1)
    ds.append(examples)
    plan = _plan("regression")
    repo = tmp_path / "repo"

    good = run_pipeline(scope, ds, None, fit, run_id="good", plan=plan)
    assert good.payload is not None
    v1, _ = publish_files(repo, model, good.payload, good.metadata)

    def off_by_ten(*args, **kw):  # type: ignore[no-untyped-def]
        result = fit(*args, **kw)
        result.module.target_mean += 4.0  # every answer four minutes late
        return result

    gateless = scope.model_copy(
        update={"gate": scope.gate.model_copy(update={"min_loss_improvement": 0.0})}
    )
    bad = run_pipeline(gateless, ds, None, off_by_ten, run_id="bad", plan=plan)
    assert bad.payload is not None, bad.decision.reason  # worse than v1, still beats the mean
    v2, _ = publish_files(repo, model, bad.payload, bad.metadata)

    against_bad = run_pipeline(
        scope, ds, None, fit, run_id="r3", plan=plan, challenged=load_stable(repo, model, v2)
    )
    assert against_bad.metadata["preempts"] == v2
    metrics = against_bad.metadata["metrics"]
    assert metrics["holdout_loss"] < metrics["preempted_loss"] - 1.0
    against_good = run_pipeline(
        scope, ds, None, fit, run_id="r4", plan=plan, challenged=load_stable(repo, model, v1)
    )
    assert "preempts" not in against_good.metadata  # the same model again: not better
