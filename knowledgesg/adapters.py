"""Writing a LoRA adapter as a release: PEFT's files, byte-stable, written whole."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

from knowledgesg.errors import SpecError
from knowledgesg.fileio import write_dir, write_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file name for an adapter's weights
ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_config.json")


def with_lora(model, r: int, alpha: float, target_modules: list[str], setting: str):
    """`model` with fresh LoRA layers on `target_modules` (peft), or a one-line error naming the
    spec key (`setting`) and the module names the model has, where a name matches none of them."""
    import torch
    from peft import LoraConfig, get_peft_model

    missing = [name for name in target_modules if not any(module == name or module.endswith("." + name) for module, _ in model.named_modules())]
    if missing:
        linear = sorted({module.rsplit(".", 1)[-1] for module, layer in model.named_modules() if isinstance(layer, torch.nn.Linear)})
        raise SpecError(f"{setting}: no module named {missing[0]!r} in the model (its linear layers: {', '.join(linear)})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside peft
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, task_type="CAUSAL_LM"))


def canonical_adapter_config(path: Path, base_model_name: str) -> None:
    """PEFT writes target_modules from a set, in an order that changes with PYTHONHASHSEED; the
    same training must give the same bytes, so sort it (PEFT reads either order). And it names the
    base model by the directory it was loaded from (a client's model cache: its user name, its
    paths, sent with every adapter it releases): the model's spec name stands there instead."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = base_model_name
    write_json(path, config)


def save_adapter(model, base_model_name: str, target: Path, before_publish: Callable[[Path], None] | None = None) -> None:
    """The PEFT adapter alone (no model card: peft's template is not ours to release), written
    whole; `before_publish` sees the finished files before they appear at `target`."""

    def build(directory: Path) -> None:
        model.save_pretrained(directory)
        (directory / "README.md").unlink(missing_ok=True)
        canonical_adapter_config(directory / "adapter_config.json", base_model_name)

    write_dir(target, build, before_publish)
