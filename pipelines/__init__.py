"""The stages of a KnowledgeSG pipeline, one module each, and the registry that checks a spec's
stages before anything runs: their parameters, their order, and budgets that cannot be met."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from knowledgesg.errors import InputError
from knowledgesg.spec import PipelineSpec, format_validation_error, load_spec, parse_spec
from knowledgesg.stage import Stage
from pipelines.calibrate import Calibrate
from pipelines.dp_train import DPTrain
from pipelines.evaluate import Evaluate
from pipelines.fedtune import Fedtune
from pipelines.ingest import Ingest
from pipelines.prepare_models import PrepareModels
from pipelines.publish import Publish
from pipelines.refine import Refine
from pipelines.structure import Structure
from pipelines.synthesize import Synthesize
from pipelines.tune_professional import TuneProfessional

STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (PrepareModels, Ingest, Structure, DPTrain, Synthesize, TuneProfessional, Refine, Fedtune, Calibrate, Evaluate, Publish)}

__all__ = ["STAGES", "build_stages", "load_pipeline", "parse_pipeline", "validate_pipeline"]


def build_stages(spec: PipelineSpec, source: str = "spec") -> list[Stage]:
    """The spec's stages with their parameters validated, in order."""
    stages = []
    for index, stage_spec in enumerate(spec.stages):
        where = f"{source}: stages[{index}]"
        if stage_spec.name not in STAGES:
            raise InputError(f"{where}: unknown stage '{stage_spec.name}' (stages: {', '.join(STAGES)})")
        stage_class = STAGES[stage_spec.name]
        try:
            stages.append(stage_class(stage_class.Params.model_validate(stage_spec.params)))
        except ValidationError as err:
            raise InputError(format_validation_error(f"{where}.params", err, stage_class.Params)) from None
    return stages


def validate_pipeline(spec: PipelineSpec, source: str) -> list[Stage]:
    """Everything about the stages that can be known from the spec alone (exit 2, nothing written)."""
    stages = build_stages(spec, source)
    names = [stage.name for stage in stages]
    for index, stage in enumerate(stages):
        for needed in stage.requires():
            if needed not in names[:index]:
                raise InputError(f"{source}: stages[{index}] ({stage.name}) needs stage '{needed}' before it (stages: {', '.join(names)})")
    _check_budget_settings(spec, stages, source)
    return stages


def _check_budget_settings(spec: PipelineSpec, stages: list[Stage], source: str) -> None:
    privacy = spec.privacy
    calibrated = any(isinstance(s, DPTrain) and s.params.noise_multiplier is None for s in stages)
    if privacy.cap_epsilon is None or not calibrated:
        return
    if math.isinf(privacy.target_epsilon):
        raise InputError(f"{source}: privacy.cap_epsilon = {privacy.cap_epsilon:g} cannot hold: target_epsilon .inf trains without noise (epsilon infinite)")
    if privacy.target_epsilon > privacy.cap_epsilon:
        raise InputError(f"{source}: privacy.target_epsilon = {privacy.target_epsilon:g} is above privacy.cap_epsilon = {privacy.cap_epsilon:g}: dp_train alone would exceed the cap")


def parse_pipeline(raw: dict[str, Any], source: str) -> tuple[PipelineSpec, list[Stage]]:
    spec = parse_spec(raw, source)
    return spec, validate_pipeline(spec, source)


def load_pipeline(path: str | Path) -> tuple[PipelineSpec, Path, list[Stage]]:
    """Read a spec file and check it whole: its schema, then its stages."""
    spec, base_dir = load_spec(path)
    return spec, base_dir, validate_pipeline(spec, str(path))
