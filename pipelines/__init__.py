"""The stages of a KnowledgeSG pipeline, one module each, and the specs that chain them."""

from __future__ import annotations

from pydantic import ValidationError

from knowledgesg.errors import InputError
from knowledgesg.spec import StageSpec, format_validation_error
from knowledgesg.stage import Stage
from pipelines.dp_train import DPTrain
from pipelines.evaluate import Evaluate
from pipelines.fedtune import Fedtune
from pipelines.ingest import Ingest
from pipelines.prepare_models import PrepareModels
from pipelines.refine import Refine
from pipelines.structure import Structure
from pipelines.synthesize import Synthesize

STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (PrepareModels, Ingest, Structure, DPTrain, Synthesize, Refine, Fedtune, Evaluate)}

__all__ = ["STAGES", "validate_stage_params"]


def validate_stage_params(stage: StageSpec, where: str) -> None:
    if stage.name not in STAGES:
        raise InputError(f"{where}: unknown stage '{stage.name}' (stages: {', '.join(STAGES)})")
    try:
        STAGES[stage.name].Params.model_validate(stage.params)
    except ValidationError as err:
        raise InputError(format_validation_error(f"{where}.params", err)) from None
