"""The tool-use adapters Lamina ships: LoRA adapters that teach a small model the agent's tool loop.

`adapters/smollm2-135m-tools` is a rank-8 LoRA of SmolLM2-135M-Instruct, trained with `lamina finetune sft`
on `python -m lamina.apps.agents.traindata` (invented documents and tools; nothing of the evaluation's
pydoc tasks). See its README for how it was made and what it scores.
"""

from __future__ import annotations

from pathlib import Path

from lamina.errors import InvalidRequestError
from lamina.llm import LLM

FOLDER = Path(__file__).parent / "adapters"
SHIPPED = {"smollm2-135m-instruct": "smollm2-135m-tools"}
"""model name -> the shipped adapter for it."""


def shipped_adapter(model_name: str) -> Path | None:
    name = SHIPPED.get(model_name)
    path = FOLDER / name if name else None
    return path if path is not None and (path / "adapter_config.json").exists() else None


def use_tool_adapter(llm: LLM, choice: str | None = "auto") -> str | None:
    """Load the adapter `choice` names into `llm` and return its name: `auto` is the shipped one for this model
    (none if there is none), `none` is the base model, anything else a PEFT adapter folder."""
    found = tool_adapter_for(llm.name, choice, param="adapter")
    if found is None:
        return None
    name = f"tools-{found[0]}"
    if name not in llm.adapters:
        llm.load_adapter(name, found[1])
    return name


def tool_adapter_for(model_name: str, choice: str | None = "auto", param: str = "tool_adapter") -> tuple[str, str] | None:
    """(served name, folder) of the tool-use adapter `choice` names for a server of `model_name` (as in
    `use_tool_adapter`), or None."""
    if choice in (None, "none"):
        return None
    path = shipped_adapter(model_name) if choice == "auto" else Path(choice)
    if path is None:
        return None
    if not (path / "adapter_config.json").exists():
        raise InvalidRequestError(f"{path} is not a LoRA adapter folder (no adapter_config.json); give a folder that "
                                  "`lamina finetune sft` wrote, `auto` or `none`", param=param)
    return path.name, str(path)
