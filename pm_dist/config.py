"""The run configuration: one typed tree, loaded from YAML plus ``key.sub=value`` overrides.

``RunConfig()`` with no file is the embedded default: a small encoder on synthetic identities that
trains on CPU in a few minutes (``make demo``). ``configs/*.yaml`` hold the recipes users start from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pm_dist.config_io import ConfigError, apply_overrides, from_dict, load_yaml
from pm_dist.data.config import DataConfig
from pm_dist.heads import HEADS, HeadSpec, head_spec
from pm_dist.heads.margin import build_margin
from pm_dist.mining import MiningConfig
from pm_dist.suggest import did_you_mean


@dataclass
class RunSection:
    out_dir: str = "runs/demo"
    seed: int = 0
    steps: int | None = None  # training steps (micro-batches); null with run.epochs, else 400
    # epochs over the dataset instead of steps: steps = epochs × (dataset images // global batch),
    # resolved when the run starts (printed, and saved in config.yaml)
    epochs: float | None = None
    log_every: int = 20
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 200  # 0: only at the end
    keep_checkpoints: int = 2
    export_onnx: bool = False
    progress: bool = True  # rich progress bar on rank 0 (off: plain log lines)
    wandb: bool = False  # also log to Weights & Biases (pip install 'pm_dist[wandb]')
    wandb_project: str = "pm_dist"  # W&B project (WANDB_PROJECT wins)

    def __post_init__(self):
        if self.steps is None and self.epochs is None:
            self.steps = 400

    def validate(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"run.steps={self.steps} and run.epochs={self.epochs:g} are mutually "
                             "exclusive: set one (e.g. run.steps=null run.epochs=20)")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"run.epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"run.steps must be ≥ 1, got {self.steps}")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"run.{name} must be ≥ 0")
        if self.keep_checkpoints < 1:
            raise ValueError("run.keep_checkpoints must be ≥ 1")


@dataclass
class BatchSection:
    classes_per_batch: int = 64  # P: identities in the *global* batch
    images_per_class: int = 2  # K ≥ 2: every sampled class yields a real prototype
    grad_accum: int = 1  # micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)

    def validate(self):
        if self.classes_per_batch < 1:
            raise ValueError("batch.classes_per_batch must be ≥ 1")
        if self.images_per_class < 2:
            raise ValueError("batch.images_per_class must be ≥ 2 (prototypes need two exemplars)")
        if self.grad_accum < 1:
            raise ValueError("batch.grad_accum must be ≥ 1")

    @property
    def global_batch(self) -> int:
        return self.classes_per_batch * self.images_per_class

    def per_rank(self, world_size: int) -> int:
        """Images per rank and micro-step; the global batch must split evenly over the ranks."""
        if self.global_batch % world_size:
            raise ConfigError(f"the global batch of {self.global_batch} images "
                              "(batch.classes_per_batch × batch.images_per_class) does not split "
                              f"over {world_size} ranks")
        return self.global_batch // world_size


@dataclass
class ModelSection:
    name: str = "tiny"  # or insightface's r18, r34, r50, r100, mbf
    embedding_size: int = 128
    dropout: float = 0.0
    # start from trained weights: a pm_dist encoder file, an insightface backbone.pth or a
    # checkpoint directory (the head starts fresh; ignored when the run resumes)
    init_from: str | None = None

    def validate(self):
        from pm_dist.models import canonical_name

        try:  # insightface's r50, mbf, ... become iresnet50, mobilefacenet, ...
            self.name = canonical_name(self.name)
        except ValueError as err:
            raise ValueError(f"model.name: {err}") from None
        if self.embedding_size < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("model.embedding_size must be ≥ 1 and model.dropout in [0, 1)")
        if self.init_from == "":
            self.init_from = None


@dataclass
class MarginSection:
    kind: Literal["cosface", "arcface", "combined"] = "cosface"
    s: float = 64.0
    m: float | None = None  # cosface/arcface margin (defaults 0.35 / 0.5)
    m1: float = 1.0  # combined margin cos(m1·θ + m2) − m3
    m2: float = 0.0
    m3: float = 0.0

    def build(self):
        return build_margin(self.kind, self.s, self.m, self.m1, self.m2, self.m3)

    def validate(self):
        self.build()


@dataclass
class HeadSection:
    """``head``: which head, its margin, and one options section per registered head
    (``head.memory`` for Prototype Memory, ``head.partial_fc``, ``head.full_fc``, yours)."""

    name: str = "prototype_memory"
    margin: MarginSection = field(default_factory=MarginSection)
    lr_scale: float = 1.0  # learned heads: their lr relative to the encoder's
    # every registered head's options, by section name (config_io fills it: see open_sections)
    sections: dict[str, Any] = field(
        default_factory=lambda: {spec.section: spec.options() for spec in HEADS.values()})

    @classmethod
    def open_sections(cls) -> dict[str, type]:
        return {spec.section: spec.options for spec in HEADS.values()}

    def validate(self):
        if self.name not in HEADS:
            raise ConfigError(f"head.name: {self.name!r} is not one of {sorted(HEADS)}"
                              f"{did_you_mean(self.name, HEADS)}")
        if not self.lr_scale > 0:
            raise ValueError(f"head.lr_scale must be > 0, got {self.lr_scale}")

    @property
    def spec(self) -> HeadSpec:
        return head_spec(self.name)

    @property
    def options(self):
        """The chosen head's options (e.g. a ``MemoryConfig`` for ``prototype_memory``)."""
        return self.sections[self.spec.section]

    def check(self, classes_per_batch: int, world_size: int | None) -> None:
        spec = self.spec
        if spec.check is not None:
            try:
                spec.check(self.options, classes_per_batch, world_size)
            except ConfigError:
                raise
            except ValueError as err:
                raise ConfigError(str(err)) from None


@dataclass
class OptimSection:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    warmup_steps: int | None = None  # linear warm-up in optimizer steps (null: 20, or warmup_epochs)
    warmup_epochs: float | None = None  # warm-up in epochs instead (resolved like run.epochs)
    power: float = 2.0  # poly: lr·(1 − progress)^power
    min_lr: float = 0.0
    grad_clip: float = 5.0  # encoder gradient norm clip (DeepSpeed gradient_clipping); 0: off

    def __post_init__(self):
        if self.warmup_steps is None and self.warmup_epochs is None:
            self.warmup_steps = 20

    def validate(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} and optim.warmup_epochs="
                             f"{self.warmup_epochs} are mutually exclusive: set one")
        if (self.warmup_steps or 0) < 0 or (self.warmup_epochs or 0) < 0 or self.grad_clip < 0:
            raise ValueError("optim.warmup_steps, optim.warmup_epochs and optim.grad_clip must be ≥ 0")


@dataclass
class DeepSpeedSection:
    # A DeepSpeed JSON (configs/deepspeed/*.json). zero_stage and precision left unset take the
    # JSON's values (else 0 and fp32); set, they override it. Resolved once, when the config loads.
    config: str | None = None
    zero_stage: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    effective_zero_stage: int = field(init=False, repr=False, default=0)
    effective_precision: str = field(init=False, repr=False, default="fp32")

    def validate(self):
        ds = self.json()
        self.effective_zero_stage = (self.zero_stage if self.zero_stage is not None else
                                     int(ds.get("zero_optimization", {}).get("stage", 0)))
        self.effective_precision = self.precision or (
            "bf16" if ds.get("bf16", {}).get("enabled") else
            "fp16" if ds.get("fp16", {}).get("enabled") else "fp32")
        if self.effective_zero_stage not in (0, 1, 2):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {self.effective_zero_stage}")

    def json(self) -> dict:
        if not self.config:
            return {}
        try:
            with open(self.config) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"deepspeed.config {self.config}: {err}") from None


@dataclass
class EvalSection:
    synthetic_pairs: int = 600  # held-out synthetic verification pairs (0: no synthetic eval)
    identification_identities: int = 200  # held-out identities of the synthetic 1:N search
    bin_files: list[str] = field(default_factory=list)  # insightface .bin sets (lfw.bin, ...)
    image_size: int | None = None  # .bin images are resized to this (default: data.image_size)
    batch_size: int = 256
    # more suites, by registered name: [{name: pairs, pairs: ijbc_pairs.txt, templates: ...}, ...]
    suites: list[dict] = field(default_factory=list)
    # keep the encoder that scored best on this evaluation number ("<result name>/<key>", as in
    # metrics.jsonl's eval/<result name>/<key>): best_encoder.pt and best.json in the run dir
    best_metric: str | None = None
    best_mode: Literal["higher", "lower"] = "higher"  # which way is better

    def validate(self):
        from pm_dist.eval.suites import parse_suite

        if self.batch_size < 1 or self.synthetic_pairs < 0 or self.identification_identities < 1:
            raise ValueError("eval.batch_size and eval.identification_identities must be ≥ 1, "
                             "eval.synthetic_pairs ≥ 0")
        for i, entry in enumerate(self.suites):
            parse_suite(entry, f"eval.suites[{i}]")
        if self.best_metric is not None and "/" not in self.best_metric:
            raise ValueError(f"eval.best_metric={self.best_metric!r}: expected '<result name>/<key>', "
                             "e.g. synthetic-pairs/accuracy or lfw/accuracy")


@dataclass
class DistSection:
    backend: str | None = None  # default: nccl on CUDA, gloo otherwise
    timeout_s: float = 600.0  # a rank waiting longer than this on a dead peer fails the job

    def validate(self):
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"dist.backend must be gloo or nccl, got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ValueError("dist.timeout_s must be > 0")


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchSection = field(default_factory=BatchSection)
    model: ModelSection = field(default_factory=ModelSection)
    head: HeadSection = field(default_factory=HeadSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    eval: EvalSection = field(default_factory=EvalSection)
    dist: DistSection = field(default_factory=DistSection)
    mining: MiningConfig = field(default_factory=MiningConfig)  # doppelganger mining (docs/mining.md)

    def validate(self):
        accum = self.batch.grad_accum
        if (self.run.steps or 0) % accum or self.run.checkpoint_every % accum:
            raise ValueError(f"run.steps and run.checkpoint_every must be multiples of "
                             f"batch.grad_accum={accum} (a checkpoint inside an accumulation "
                             "window could not resume it)")
        self.head.check(self.batch.classes_per_batch, None)
        for name, size in (("data.image_size", self.data.image_size),
                           ("eval.image_size", self.eval.image_size)):
            if size is not None and size % 16:
                raise ValueError(f"{name}={size}: the encoders need a multiple of 16")
        self.mining.check_lookahead(self.data.num_workers * self.data.prefetch_factor
                                    if self.data.num_workers else 0)

    def preflight(self, world_size: int) -> None:
        """What depends on this machine and the number of ranks, checked before any process group
        starts (a recipe names files and GPUs it does not have where it is only loaded)."""
        for path in self.eval.bin_files:
            if not os.path.isfile(path):
                raise ConfigError(f"eval.bin_files: {path} does not exist")
        if self.model.init_from and not os.path.exists(self.model.init_from):
            raise ConfigError(f"model.init_from: {self.model.init_from} does not exist")
        if self.deepspeed.effective_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("deepspeed.precision=fp16 needs CUDA (DeepSpeed's fp16 loss scaling "
                              "does not run on CPU): use bf16 or fp32")
        self.batch.per_rank(world_size)
        self.head.check(self.batch.classes_per_batch, world_size)
        if self.run.wandb:
            from pm_dist.metrics import check_wandb

            try:
                check_wandb()
            except ImportError as err:
                raise ConfigError(str(err)) from None


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The embedded default, updated by the YAML file at ``path``, then by the overrides."""
    data = load_yaml(path) if path else {}
    if isinstance(data.get("data"), dict) and "proposal_fraction" in data["data"]:
        raise ConfigError("data.proposal_fraction was removed: the share of mined identities is "
                          "mining.fraction, used when mining.enabled is true (docs/mining.md)")
    data = apply_overrides(data, list(overrides or []), RunConfig)
    return from_dict(RunConfig, data)


__all__ = ["RunConfig", "load_config", "ConfigError"]
