"""The training loop shared by `loram train` (LoRA, loram.train) and `loram align` (loram.align).

    config.py       TrainReport (what train and align report; their knobs: loram.configs)
    trainer.py      fit: transformers' Trainer with loram's subclass and callbacks (non-finite loss,
                    Ctrl-C, held-out perplexity, chunked loss), torchrun / accelerate as launched
    checkpoint.py   checkpoint folders: the completion marker, --resume's settings check, a full disk
    state.py        optimizer / scheduler / RNG state as safetensors + JSON (resume never unpickles)
    distributed.py  what train / align need from DDP, FSDP 1/2, DeepSpeed: the trained weights gathered on
                    every rank, sparse masks on each rank's shard, engine combinations refused before loading
"""

from ..configs import RunConfig
from .checkpoint import (CHECKPOINT_MARK, RESUME_SAFE, check_resume_settings, claim_run, complete_checkpoints, is_main,
                         last_checkpoint, run_settings, save_final)
from .config import TrainReport
from .trainer import FitResult, NonFiniteLoss, TrainingInterrupted, finish, fit, param_counts, run_precision

__all__ = ["CHECKPOINT_MARK", "RESUME_SAFE", "FitResult", "NonFiniteLoss", "RunConfig", "TrainReport", "TrainingInterrupted",
           "check_resume_settings", "claim_run", "complete_checkpoints", "finish", "fit", "is_main", "last_checkpoint", "param_counts",
           "run_precision", "run_settings", "save_final"]
