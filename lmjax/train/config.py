"""The training run's configuration (gin binds it as `train`: `train.batch_size = 64`)."""

import dataclasses
from typing import Any

from lmjax.models.transformer import GPTConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: Any = None  # a registered model config, e.g. GPTConfig() (lmjax.models.MODELS)
    task: str = "lm"  # a name in lmjax.train.registry.TASKS
    num_steps: int = 5000
    batch_size: int = 64  # global, over all devices and processes
    learning_rate: float = 1e-3  # peak
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # defaults to num_steps
    lr_decay: str = "cosine"  # after warmup, down to min_lr at decay_steps; or "linear"
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    microbatches: int = 1
    # Microbatches of the pipeline schedule over mesh.stage (lmjax/parallel/pipeline.py):
    # each (train.microbatches) batch is split into this many inside the layer stack.
    # More shrink the bubble, (stages - 1) / (pipeline_microbatches + stages - 1). Needs
    # GPTConfig.scan_layers when above 1; 1 with mesh.stage = 1 is no pipeline.
    pipeline_microbatches: int = 1
    # Optimiser steps per compiled call: a lax.scan over that many batches pays the
    # call's fixed host cost (dispatch, placing the batch, the wait) once for all of them.
    steps_per_call: int = 1
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 200
    eval_batch_size: int | None = None  # defaults to batch_size
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    seed: int = 1337
    optimizer: str = "adamw"  # a name in lmjax.train.optim.OPTIMIZERS
    # Magnitude pruning (lmjax/train/prune.py); the CLI fills it from the `prune` bindings.
    prune: Any = None
    # A wall-clock cap: after this many minutes of training (this invocation's, compiling
    # included) the run evaluates, saves and stops as if at its last step. Rerunning
    # resumes towards num_steps. None: no cap.
    max_minutes: float | None = None

    @property
    def eval_rows(self) -> int:
        return self.eval_batch_size or self.batch_size

    def check_model(self) -> None:
        if self.model is None:
            raise ValueError("train.model is not set; bind a model config, for example "
                             "train.model = @GPTConfig() (see configs/models/)")

    def validate(self, parallelism: int, stages: int = 1) -> None:
        """Raises ValueError naming the binding to change; parallelism = data * fsdp,
        stages = mesh.stage."""
        self.check_model()
        positive = ("num_steps", "batch_size", "microbatches", "pipeline_microbatches",
                    "steps_per_call", "log_every", "eval_every", "checkpoint_every",
                    "eval_batches", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"train.max_minutes must be positive, got {self.max_minutes}")
        if self.batch_size % self.microbatches:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by "
                             f"train.microbatches={self.microbatches}")
        for rows, what in ((self.batch_size // self.microbatches, "microbatch"),
                           (self.eval_rows, "eval batch")):
            if rows % parallelism:
                raise ValueError(
                    f"a {what} of {rows} rows does not divide over data*fsdp={parallelism} "
                    "devices; change train.batch_size, train.microbatches, "
                    "train.eval_batch_size or the mesh")
            if rows // parallelism % self.pipeline_microbatches:
                raise ValueError(
                    f"a {what} of {rows} rows has {rows // parallelism} per data*fsdp "
                    f"replica, which do not split into train.pipeline_microbatches="
                    f"{self.pipeline_microbatches}; change train.pipeline_microbatches, "
                    "train.batch_size, train.microbatches or train.eval_batch_size")
        if self.lr_decay not in ("cosine", "linear"):
            raise ValueError(f"unknown train.lr_decay {self.lr_decay!r}; use 'cosine' or "
                             "'linear'")
        self._check_pipeline(stages)
        if self.prune is not None:
            self.prune.validate(self.num_steps)

    def _check_pipeline(self, stages: int) -> None:
        if stages == 1 and self.pipeline_microbatches == 1:
            return
        model = self.model
        if not isinstance(model, GPTConfig):
            raise ValueError(f"pipelining (mesh.stage={stages}, train.pipeline_microbatches="
                             f"{self.pipeline_microbatches}) is for the GPT, not "
                             f"{type(model).__name__}; set mesh.stage = 1 and "
                             "train.pipeline_microbatches = 1")
        if not model.scan_layers:
            raise ValueError(f"pipelining (mesh.stage={stages}, train.pipeline_microbatches="
                             f"{self.pipeline_microbatches}) runs the stacked layers; set "
                             "GPTConfig.scan_layers = True")
        if model.num_layers % stages:
            raise ValueError(f"mesh.stage={stages} does not divide GPTConfig.num_layers="
                             f"{model.num_layers}; choose a stage count that divides it")
