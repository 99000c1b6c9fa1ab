"""The declared contracts between the model and the data module (renio_pl.contracts)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl

import pytest

from renio_pl.contracts import EvaluationData, RolloutPolicy, Teaching, evaluation_data
from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.errors import ConfigError
from renio_pl.module import DistillationModule
from renio_pl.offline import OfflineDistillationModule, TraceDataModule
from renio_pl.refinement import Refiner
from renio_pl.rollouts import HFGenerator, SamplingConfig


def test_our_models_and_data_modules_provide_the_contracts(model_dirs):
    student = str(model_dirs["student"])
    assert isinstance(DistillationModule(student, str(model_dirs["teacher"])), RolloutPolicy)
    assert isinstance(OfflineDistillationModule(student), RolloutPolicy)
    assert isinstance(OnPolicyDataModule(tokenizer=student), EvaluationData)
    assert isinstance(TraceDataModule(tokenizer=student), EvaluationData)


def test_the_refiner_reads_the_model_only_through_teaching(model_dirs):
    """OPD's rewriter is a model of its own, OPSD's the student's base weights; a model without `Teaching` is refused."""
    student = str(model_dirs["student"])
    opd, opsd = DistillationModule(student, str(model_dirs["teacher"])), DistillationModule(student)
    assert isinstance(opd, Teaching) and opd.separate_teacher and not opsd.separate_teacher
    Refiner().check_model(opd, HFGenerator())
    offline = OfflineDistillationModule(student)
    assert not isinstance(offline, Teaching)
    with pytest.raises(ConfigError, match=r"^data.refiner: the model \(OfflineDistillationModule\) does not provide"):
        Refiner().check_model(offline, HFGenerator())


def test_a_data_module_of_your_own_gets_the_defaults(model_dirs):
    """Without `EvaluationData` the module assumes plain OPD data: one sample per problem, no benchmarks."""
    own = pl.LightningDataModule()
    assert not isinstance(own, EvaluationData) and evaluation_data(SimpleNamespace(datamodule=own)) is None
    assert evaluation_data(None) is None and evaluation_data(SimpleNamespace()) is None
    module = DistillationModule(str(model_dirs["student"]), str(model_dirs["teacher"]))
    module.trainer = SimpleNamespace(datamodule=own)
    module.setup("validate")
    assert list(module.val_metrics.keys()) == ["avg@1"]
    module.setup("test")
    assert len(module.test_metrics) == 0


def test_the_data_module_says_how_many_samples_each_evaluation_takes(model_dirs):
    student = str(model_dirs["student"])
    data = OnPolicyDataModule(tokenizer=student, val_sampling=SamplingConfig(n=4, temperature=1.0))
    module = DistillationModule(student, str(model_dirs["teacher"]), pass_at_k=[2, 4])
    module.trainer = SimpleNamespace(datamodule=data)
    module.setup("validate")
    assert sorted(module.val_metrics.keys()) == ["avg@4", "maj@4", "pass@2", "pass@4"]
