"""Stage `prepare_models`: resolve every model the spec names, converting packaged GGUF once.

Its artifact, `models.json`, is how later stages find their models (path and weight hash), so
a run records exactly which weights it used. A model in the cache is named relative to the cache
(`cache:models/NAME`): later stages read it with `StageContext.models()`, which finds it in this
machine's cache.
"""

from __future__ import annotations

from pathlib import Path

from knowledgesg.errors import InputError, SpecError
from knowledgesg.fileio import unmakeable_directory
from knowledgesg.models import cache_root, check_model_name, model_entry, resolve_model, source_files
from knowledgesg.spec import PipelineSpec
from knowledgesg.stage import Stage, StageContext

ROLES = ("base", "professional", "embedder")


def named_models(spec: PipelineSpec) -> dict[str, str]:
    return {role: getattr(spec.models, role) for role in ROLES if getattr(spec.models, role)}


def model_kinds(spec: PipelineSpec, base_dir: Path) -> dict[str, str]:
    """Each named model's kind (`check_model_name`, a local directory taken from `base_dir`, the
    spec's directory), a name it would refuse naming its spec key."""
    kinds = {}
    for role, name in named_models(spec).items():
        try:
            kinds[role] = check_model_name(name, base_dir)
        except InputError as err:
            raise SpecError(f"models.{role}: {err}") from None  # the spec file's name goes before it
    return kinds


class PrepareModels(Stage):
    name = "prepare_models"
    uses = ("models",)

    def side(self) -> str:
        return "both"  # every party resolves the same models (their hashes are in models.json)

    def external_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        return [file for name in named_models(spec).values() for file in source_files(name, base_dir)]

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        if not {"packaged", "tiny"} & set(model_kinds(spec, base_dir).values()):
            return  # local directories and Hugging Face ids are read where they are, not from the cache
        root = cache_root(spec.models.cache_dir)
        problem = unmakeable_directory(root)
        if problem:
            raise SpecError(f"models.cache_dir {root}: {problem}")

    def run(self, ctx: StageContext) -> None:
        cache_dir = ctx.spec.models.cache_dir
        ctx.write_json("models.json", {role: model_entry(resolve_model(name, cache_dir, ctx.base_dir), cache_dir) for role, name in named_models(ctx.spec).items()})
