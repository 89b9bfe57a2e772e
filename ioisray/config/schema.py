"""The config's schema: one typed section per concern, strict (an unknown key or a bad value is an error
that names the key). Loading, composition and overrides are in loading.py."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ioisray.sampler_config import SamplerConfig


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


class RunFinishedError(RuntimeError):
    """The run folder already holds final results: its test split was already used once."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    name: Literal["digits_lt", "ham10000", "aptos", "dermamnist", "imagefolder", "csv"] = "digits_lt"
    root: Optional[str] = None  # dataset folder (not needed for the embedded digits)
    csv: Optional[str] = None  # for name=csv: the path,label CSV (default: <root>/labels.csv)
    image_size: int = Field(32, ge=8, le=1024)
    imbalance_ratio: float = Field(50.0, ge=1.0)  # digits_lt only: largest / smallest class
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # The seed of the split (and of digits_lt's subsample); None: `seed`. Fix it to vary only the
    # training seed over one split, e.g. to share one diffusion model across a benchmark's seeds.
    split_seed: Optional[int] = Field(None, ge=0)
    on_bad_image: Literal["error", "skip"] = "error"
    num_threads: int = Field(4, ge=1)  # image decoding threads
    # Read image paths of a CSV that lead outside data.root (or the CSV's folder): `..`, absolute
    # paths, symlinks. Off, so that a CSV from elsewhere cannot pull in files the user did not mean.
    allow_outside_root: bool = False

    @model_validator(mode="after")
    def _needs_root(self):
        if self.name not in ("digits_lt", "csv") and not self.root:
            raise ValueError(f"data.root is required for data.name={self.name!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.val_fraction + data.test_fraction must be < 1")
        return self


class ModelConfig(_Strict):
    name: str = "resnet18"  # any timm model name
    weights: Optional[str] = None  # .safetensors/.pth file, local or a filesystem URI; never from a hub
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _no_hub_download(cls, v: str) -> str:
        # timm fetches an "hf-hub:" model's config from the Hugging Face Hub even without pretrained
        # weights; runs here stay offline, and weights come from a local file.
        if v.startswith("hf-hub:"):
            raise ValueError(f"model.name {v!r} would be downloaded from the Hugging Face Hub; name the timm "
                             f"architecture (e.g. resnet50) and give its weights as a local file in model.weights")
        return v


class AugmentConfig(_Strict):
    crop_scale: tuple[float, float] = (0.7, 1.0)  # RandomResizedCrop area range; (1, 1) disables
    hflip: bool = True
    vflip: bool = False  # natural for dermoscopy and fundus images, not for digits
    color_jitter: float = Field(0.0, ge=0.0)

    @field_validator("crop_scale")
    @classmethod
    def _area_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"train.augment.crop_scale {list(v)} must be [low, high] with 0 < low <= high <= 1")
        return v


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list)  # epochs, for schedule=multistep
    gamma: float = Field(0.1, gt=0.0)
    warmup_epochs: int = Field(0, ge=0)
    max_batches_per_epoch: Optional[int] = Field(None, ge=1)  # for smoke tests
    # Keep a finished run's checkpoints (and an early-stopped search trial's). Off: a finished run is
    # never resumed, and its weights and results are files of their own, so its checkpoints go.
    keep_checkpoints: bool = False
    # Rows each worker mixes before batching (Ray Data's local shuffle). Off by default: real rows
    # already arrive in a new random order every epoch, and a buffer holds back the synthetic images,
    # which join it behind the rows it holds (see benchmarks/RESULTS.md, issue 7).
    shuffle_buffer: int = Field(0, ge=0)
    # Autocast precision of classifier training and diffusion pretraining; None: bf16 where the device
    # computes in bf16 natively (CUDA from Ampere on), else fp32 (ioisray/precision.py). fp16: CUDA only.
    precision: Optional[Literal["bf16", "fp16", "fp32"]] = None
    # Worker failures survived: Ray Train restarts the workers from the run's last checkpoint.
    max_failures: int = Field(3, ge=0)
    channels_last: bool = False  # NHWC activations: faster convolutions on tensor cores
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _milestones_after_warmup(self):
        if self.schedule == "multistep" and any(m <= self.warmup_epochs for m in self.milestones):
            raise ValueError(f"train.milestones {self.milestones} must all be after train.warmup_epochs "
                             f"({self.warmup_epochs})")
        return self


class MethodConfig(_Strict):
    loss: Literal["ce", "weighted_ce", "focal", "cb_focal", "ldam_drw", "balanced_softmax",
                  "logit_adjusted"] = "ce"
    sampling: Literal["natural", "class_balanced"] = "natural"
    mixup_alpha: float = Field(0.0, ge=0.0)  # 0 disables mixup
    focal_gamma: float = Field(2.0, ge=0.0)
    cb_beta: float = Field(0.9999, gt=0.0, lt=1.0)
    weight_power: float = Field(1.0, ge=0.0)
    ldam_max_margin: float = Field(0.5, gt=0.0)
    ldam_scale: float = Field(30.0, gt=0.0)
    drw_epoch: Optional[int] = Field(None, ge=0)  # default: 80% of train.epochs, as in LDAM-DRW
    drw_beta: float = Field(0.9999, gt=0.0, lt=1.0)
    la_tau: float = Field(1.0, ge=0.0)
    # The prior of a count-based loss under IOIS: the epoch's real + synthetic images per class (the
    # distribution trained on), or the real training split's counts only (an ablation of that choice).
    prior_counts: Literal["real_and_synthetic", "real"] = "real_and_synthetic"


class RayConfig(_Strict):
    address: Optional[str] = None  # None: start a local Ray; "auto" inside a cluster / `ray job submit`
    num_workers: int = Field(2, ge=0)  # Ray Train workers; 0 runs the loop in the driver (debugging)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    # Custom resources each Train worker needs, e.g. {train_gpu: 1} to keep it on the training nodes
    # of cluster.yaml (the synthesis actors ask for synthesis.resources).
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    local_num_cpus: Optional[int] = Field(None, ge=1)  # logical CPUs for a local Ray (default 2 * cores)
    # local Ray only; None: sized from the run's images (recipes/launch.local_object_store_bytes)
    object_store_mb: Optional[int] = Field(None, ge=64)
    start_timeout_s: float = Field(120.0, gt=0.0, description=(
        "Seconds the local Ray this command starts may take to come up (Ray's own limit is 30 s, too short "
        "on a busy machine); then the command stops with one line saying so."))

    @model_validator(mode="after")
    def _one_gpu_per_nccl_rank(self):
        # Ray would pack two training workers holding half a GPU each onto one card; both would then
        # use cuda:0, and NCCL refuses two ranks on one device ("Duplicate GPU detected").
        share = self.resources_per_worker.get("GPU", 1.0)
        if self.use_gpu and self.num_workers > 1 and 0 < share < 1:
            raise ValueError(f"ray.resources_per_worker.GPU={share:g} with ray.num_workers={self.num_workers}: "
                             "NCCL needs a whole GPU for each training worker; share a GPU only with one "
                             "worker (ray.num_workers=1), e.g. beside the synthesis actors")
        return self


class DiffusionConfig(_Strict):
    preset: Literal["tiny", "small32", "small64", "adm128"] = "tiny"
    image_size: Optional[int] = Field(None, ge=8, le=1024)  # default: the preset's size
    model_dir: Optional[str] = None  # a trained diffusers UNet2DModel folder (e.g. <run>/unet)
    # How a new model is pretrained (None: "epsilon" and "linear", the paper's ADM). A model in
    # model_dir carries its own, which sampling uses; fine-tuning it under a different one is an error.
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None
    beta_schedule: Optional[Literal["linear", "squaredcos_cap_v2"]] = None
    # Pretraining replaces a label by the null class with this probability, so the model also learns
    # the unconditional prediction that classifier-free guidance needs (0: no null class, as before).
    label_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class PretrainConfig(_Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(200, ge=0)
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0)
    hflip: bool = True
    vflip: bool = False
    sample_every: int = Field(5, ge=0)  # epochs between sample grids in TensorBoard; 0 = only at the end
    sample_steps: int = Field(25, ge=1)  # DDIM steps for those grids
    # epochs between EMA model folders kept in <run>/snapshots/epoch_<n> (to judge samples against
    # training length, benchmarks/judge_curve.sh), but the last epoch's, which is <run>/unet; 0 = none
    snapshot_every: int = Field(0, ge=0)
    max_batches_per_epoch: Optional[int] = Field(None, ge=1)  # for smoke tests


class AASConfig(_Strict):
    """Accuracy Adaptive Sampling: n_c = budget * softmax((1 - a_c) / temperature)."""

    enabled: bool = True  # false: uniform quotas every epoch (the "IOIS without AAS" ablation)
    temperature: float = Field(1.0, gt=0.0)
    floor: int = Field(0, ge=0)  # every class gets at least this many images per epoch


MAX_BUDGET = 10_000_000  # synthetic images an epoch


class SynthesisConfig(_Strict):
    """Where the synthetic images come from and how many (see ioisray/synthesis/)."""

    mode: Literal["none", "online", "offline"] = "none"  # online = IOIS; offline = one set, made once
    # Synthetic images per epoch (N). At most MAX_BUDGET: the epoch's plan holds a label and a seed per
    # image in memory, and a billion (a typo) would need about 16 GB before anything is made.
    budget: int = Field(0, ge=0)
    guidance: bool = True  # classifier guidance by the classifier being trained (online only)
    chunk_size: int = Field(32, ge=1)  # images per actor call and per Ray Data block
    pool_size: int = Field(2, ge=1)  # synthesis actors
    num_cpus: float = Field(1.0, ge=0.0)  # per actor
    num_gpus: float = Field(0.0, ge=0.0)  # per actor; fractional shares a GPU between actors
    resources: dict[str, float] = Field(default_factory=dict)  # custom resources per actor (cluster placement)
    max_retries: int = Field(3, ge=0)  # regenerations of one chunk after its actor died
    # Seconds the actors may wait for a node with room for them (an autoscaler adds one in minutes);
    # then the run fails, saying so, before Ray Train's 30-minute collective time-out would.
    start_timeout_s: float = Field(1200.0, gt=0.0)
    # Real rows enter the stream as the chunks are made (after a head start: one slice, or what fills
    # the shuffle buffers), so the chunks are not queued behind every real row; false reads them all at once.
    pace_real_reads: bool = True

    @model_validator(mode="after")
    def _budget_when_on(self):
        if self.mode != "none" and self.budget < 1:
            raise ValueError(f"synthesis.budget must be >= 1 when synthesis.mode is {self.mode!r}")
        if self.budget > MAX_BUDGET:
            raise ValueError(f"synthesis.budget={self.budget} is more than {MAX_BUDGET:,} images an epoch (the paper "
                             f"makes 2,000; at about 6 images/s per GPU, 10 million take about 20 GPU-days)")
        return self


class SearchDimension(_Strict):
    """One searched key: exactly one of `grid` (every value, crossed with the other grid keys),
    `choice` (one value drawn per trial), `uniform` / `loguniform` ([low, high]) or `randint` ([low, high))."""

    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None

    @model_validator(mode="after")
    def _exactly_one(self):
        set_ = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {set_ or 'none'})")
        values = getattr(self, set_[0])
        if set_[0] in ("grid", "choice") and not values:
            raise ValueError(f"{set_[0]} needs at least one value")
        if set_[0] in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{set_[0]} needs low < high, got {list(values)}")
        if set_[0] == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values to check against the config: the listed ones, or both ends of a range."""
        return list(getattr(self, self.kind))


class TuneSettings(_Strict):
    """`ioisray tune`: a Ray Tune search over config keys, ASHA on a validation metric."""

    search_space: dict[str, SearchDimension] = Field(default_factory=dict)  # "aas.temperature": {grid: [...]}
    num_samples: int = Field(1, ge=1)  # repeats of the grid; each repeat draws the random keys anew
    metric: Literal["val_balanced_accuracy", "val_macro_f1", "val_accuracy"] = "val_balanced_accuracy"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(2, ge=1)  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = Field(3.0, gt=1.0)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)  # default: as many as the cluster can hold at once
    max_failures: int = Field(2, ge=0)  # retries of a failed trial (it resumes from its last checkpoint)
    search_seed: int = 0  # draws of `choice` / ranges


class BenchmarkSettings(_Strict):
    """`ioisray benchmark`: methods x seeds (x datasets), each run an ordinary `ioisray train` run."""

    methods: dict[str, list[str]] = Field(default_factory=dict)  # name -> key=value overrides of this config
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    datasets: dict[str, list[str]] = Field(default_factory=dict)  # name -> overrides; empty: this config's data
    baseline: Optional[str] = None  # a method name: the per-class change figure compares the others with it
    # [method, other method] pairs whose paired differences are tabulated too (every method is against
    # `baseline`); a pair with a method not in `methods` (a grid narrowed on the command line) is left out
    compare: list[tuple[str, str]] = Field(default_factory=list)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)  # default: as many as the cluster can hold at once
    max_failures: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _baseline_is_a_method(self):
        if self.baseline is not None and self.baseline not in self.methods:
            raise ValueError(f"benchmark.baseline {self.baseline!r} is not one of benchmark.methods "
                             f"{sorted(self.methods)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"benchmark.seeds has repeats: {self.seeds}")
        return self


class Config(_Strict):
    name: str = "run"  # run name: outputs go to <output_dir>/<name>; reusing it resumes that run
    seed: int = 0
    output_dir: str = "outputs"  # a local folder, or a pyarrow filesystem URI (s3://bucket/prefix, ...)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)  # see ioisray/sampler_config.py
    aas: AASConfig = Field(default_factory=AASConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    # What to compare per-class test accuracy with at the end (the per-class change figure): a finished
    # run's folder, or an experiment config (.yaml), whose run is trained first if it has not finished.
    baseline: Optional[str] = None
    tune: TuneSettings = Field(default_factory=TuneSettings)  # read by `ioisray tune` only
    benchmark: BenchmarkSettings = Field(default_factory=BenchmarkSettings)  # read by `ioisray benchmark` only

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("name must be a plain folder name (no '/', not starting with '.')")
        return v

    @model_validator(mode="after")
    def _searched_keys_exist(self):
        for key in self.tune.search_space:
            if not is_config_key(key):
                raise ValueError(f"tune.search_space: {key!r} is not a config key")
        return self

    @property
    def split_seed(self) -> int:
        """The seed that fixes the data split: `data.split_seed`, or `seed` when that is not set."""
        return self.seed if self.data.split_seed is None else self.data.split_seed


def is_config_key(key: str) -> bool:
    """Whether a dotted key (`aas.temperature`) names a setting of Config (a leaf or a dict-valued one)."""
    model: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = section_fields(model)
        if fields is None or part not in fields:
            return False
        model = fields[part]
        if i < len(parts) - 1 and section_fields(model) is None:
            return False
    return True


def section_fields(model: Any) -> Optional[dict[str, Any]]:
    """{name: type} of a config section (a pydantic model or a dataclass such as SamplerConfig); None
    for anything else."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {k: f.annotation for k, f in model.model_fields.items()}
    if isinstance(model, type) and dataclasses.is_dataclass(model):
        return {f.name: f.type for f in dataclasses.fields(model)}
    return None
