"""`lamina finetune ...`: supervised fine-tuning, preference tuning and classification heads on a pretrained model."""

from __future__ import annotations

import click


@click.group()
def finetune() -> None:
    """Fine-tune a pretrained model (SFT, DPO, classification), fully or with LoRA."""
