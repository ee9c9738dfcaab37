"""Writing a LoRA adapter as a release: PEFT's files, byte-stable, written whole."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from knowledgesg.fileio import write_dir, write_json

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def canonical_adapter_config(path: Path) -> None:
    """PEFT writes target_modules from a set, in an order that changes with PYTHONHASHSEED; the
    same training must give the same bytes, so sort it (PEFT reads either order)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    write_json(path, config)


def save_adapter(model, target: Path, before_publish: Callable[[Path], None] | None = None) -> None:
    """The PEFT adapter alone (no model card: peft's template is not ours to release), written
    whole; `before_publish` sees the finished files before they appear at `target`."""

    def build(directory: Path) -> None:
        model.save_pretrained(directory)
        (directory / "README.md").unlink(missing_ok=True)
        canonical_adapter_config(directory / "adapter_config.json")

    write_dir(target, build, before_publish)
