"""Model specs (``models/*.yaml`` in a project): valid ones load, bad ones fail at start with
the file and the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from loopmesh.mesh.feature_repo import FEATURE_REPO_DIR
from loopmesh.mesh.model_spec import (
    SpecError,
    check_features,
    import_factory,
    load_specs,
    parse,
    section,
)

GOOD = """
name: churn
task: multiclass
classes: 4
inputs:
  features: [customer_spend:spend_2h, item_stats:min_price]
  context:
    - {name: hour}
    - {name: device, kind: categorical, buckets: 64}
label: {source: label}
module: {factory: "loopmesh.trainer.models:mlp", args: {hidden: [8]}}
training: {max_epochs: 5}
rollout: {weights: [0.1, 0.5]}
"""


def test_a_valid_spec_and_the_default_project() -> None:
    spec = parse(GOOD, "models/churn.yaml")
    assert (spec.name, spec.task, spec.outputs) == ("churn", "multiclass", 4)
    assert [c.name for c in spec.inputs.context] == ["hour", "device"]
    specs = load_specs(FEATURE_REPO_DIR)
    assert list(specs) == ["ctr"]
    assert specs["ctr"].task == "binary" and len(specs["ctr"].inputs.context) == 8
    factory = import_factory(specs["ctr"], "models/ctr.yaml")
    module = factory(8, 1, **specs["ctr"].module.args)
    assert sum(p.numel() for p in module.parameters()) == 8 * 32 + 32 + 32 * 16 + 16 + 16 + 1


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (("task: multiclass", "task: ranking"), "task", "Input should be 'binary'"),
        (("classes: 4\n", ""), "(top level)", "classes is required for multiclass"),
        (("{name: hour}", "{name: hour, buckets: 3}"), "inputs.context.0", "for categorical"),
        (
            ("kind: categorical, buckets: 64", "kind: categorical"),
            "inputs.context.1",
            "needs buckets or a vocabulary",
        ),
        (("training:", "trainnig:"), "trainnig", "Extra inputs are not permitted"),
        (('"loopmesh.trainer.models:mlp"', "mlp"), "module", "is not 'package.module:callable'"),
        (("customer_spend:spend_2h", "spend_2h"), "inputs", "is not a 'view:feature'"),
    ],
)
def test_a_bad_spec_names_the_file_and_the_field(
    change: tuple[str, str], field: str, reason: str
) -> None:
    old, new = change
    with pytest.raises(SpecError) as err:
        parse(GOOD.replace(old, new), "models/churn.yaml")
    assert err.value.field == f"models/churn.yaml: {field}"
    assert reason in err.value.message, err.value.message


def test_features_the_project_does_not_declare_are_refused() -> None:
    spec = parse(GOOD, "models/churn.yaml")
    known = ["customer_spend:spend_2h", "item_stats:min_price"]
    assert check_features(spec, "models/churn.yaml", known, {}) == known
    with pytest.raises(SpecError, match=r"inputs.features\[1\]: the project declares no"):
        check_features(spec, "models/churn.yaml", known[:1], {})
    by_service = parse(
        GOOD.replace(
            "features: [customer_spend:spend_2h, item_stats:min_price]",
            "feature_service: churn_inputs",
        ),
        "models/churn.yaml",
    )
    with pytest.raises(SpecError, match=r"inputs\.feature_service: the project declares no"):
        check_features(by_service, "models/churn.yaml", known, {"other": known})
    assert check_features(by_service, "m", known, {"churn_inputs": known[:1]}) == known[:1]


def test_a_factory_that_cannot_be_imported_fails_with_the_reason() -> None:
    missing = parse(GOOD.replace("loopmesh.trainer.models:mlp", "no_such_pkg.nets:mlp"), "m.yaml")
    with pytest.raises(SpecError, match=r"m.yaml: module.factory: cannot import 'no_such_pkg"):
        import_factory(missing, "m.yaml")
    absent = parse(GOOD.replace("models:mlp", "models:resnet"), "m.yaml")
    with pytest.raises(SpecError, match=r"has no callable 'resnet'"):
        import_factory(absent, "m.yaml")


def test_a_deployables_section_is_validated_by_its_own_model() -> None:
    class Training(BaseModel):
        max_epochs: int = Field(default=80, ge=1)
        batch_size: int = 128

    spec = parse(GOOD, "models/churn.yaml")
    assert section(spec, "models/churn.yaml", "training", Training).max_epochs == 5
    bad = parse(GOOD.replace("max_epochs: 5", "max_epochs: 0"), "models/churn.yaml")
    with pytest.raises(SpecError) as err:
        section(bad, "models/churn.yaml", "training", Training)
    assert err.value.field == "models/churn.yaml: training.max_epochs"


def test_two_files_may_not_specify_one_model(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.yaml").write_text(GOOD)
    (tmp_path / "models" / "b.yaml").write_text(GOOD)
    with pytest.raises(SpecError, match=r"models/b.yaml: name: model 'churn' is specified twice"):
        load_specs(tmp_path)
    assert load_specs(tmp_path / "nowhere") == {}
