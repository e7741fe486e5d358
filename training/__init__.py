"""Adapter training: generated tasks with exact-match grading, PEFT LoRA / IA3 and LoRAFleet FLoRA trainers."""

from lorafleet.training.tasks import TASKS, Example, Task, exact_match
from lorafleet.training.trainer import ADAPTER_TYPES, TrainConfig, TrainResult, train

__all__ = ["ADAPTER_TYPES", "TASKS", "Example", "Task", "TrainConfig", "TrainResult", "exact_match", "train"]
