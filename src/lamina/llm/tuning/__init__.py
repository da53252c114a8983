"""Fine-tuning: SFT, DPO, classification heads, their datasets, and LoRA adapters in PEFT's layout."""
