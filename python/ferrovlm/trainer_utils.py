"""What a training run writes and reads besides the weights (transformers' ``trainer_utils`` and the
``TrainerState`` of ``trainer_callback``): checkpoint file names, the state, the output of ``train()``."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

PREFIX_CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
SCHEDULER_NAME = "scheduler.json"
RNG_STATE_NAME = "rng_state.json"
TRAINING_ARGS_NAME = "training_args.json"


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict[str, float]


@dataclass
class TrainerState:
    """transformers' ``TrainerState`` fields that a run and its checkpoints need."""

    epoch: Optional[float] = None
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: Optional[int] = None
    save_steps: int = 500
    train_batch_size: Optional[int] = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0.0
    log_history: list[dict[str, float]] = field(default_factory=list)
    best_metric: Optional[float] = None
    best_model_checkpoint: Optional[str] = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    # ferrovlm: TRL's running token count, needed to resume `num_tokens` exactly.
    total_train_tokens: int = 0

    def save_to_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_from_json(cls, path: str | os.PathLike[str]) -> TrainerState:
        data = json.loads(Path(path).read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def sorted_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints (those with a trainer_state.json), oldest step first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", p.name)
        if m and p.is_dir() and (p / TRAINER_STATE_NAME).is_file():
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]
