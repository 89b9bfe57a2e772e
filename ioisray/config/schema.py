"""The config's schema: one typed section per concern, strict (an unknown key or a bad value is an error
that names the key). Loading, composition and overrides are in loading.py."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ioisray.sampler_config import SamplerConfig


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


class RunFinishedError(RuntimeError):
    """The run folder already holds final results: its test split was already used once."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    name: Literal["digits_lt", "ham10000", "aptos", "dermamnist", "imagefolder", "csv"] = Field(
        "digits_lt", description="The dataset layout to read; digits_lt is scikit-learn's bundled digits, made "
        "long-tailed, and needs no files.")
    root: Optional[str] = Field(None, description="The dataset's folder (for dermamnist also its .npz file); "
                                "required by every layout but digits_lt and csv.")
    csv: Optional[str] = Field(None, description="For name=csv: the CSV of path,label rows (optional group and split "
                               "columns); unset: <data.root>/labels.csv.")
    image_size: int = Field(32, ge=8, le=1024, description="Side in pixels that every image is resized to "
                            "(square, aspect not kept), for training, evaluation and the diffusion model.")
    imbalance_ratio: float = Field(50.0, ge=1.0, description="For digits_lt only: images in the largest class "
                                   "over images in the smallest, the classes thinned along an exponential profile.")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of the images held out for validation "
                                "(model selection); with an official split that has no validation rows, the share "
                                "of its training rows carved out.")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of the images held out for the one test "
                                 "at the end of a run; with an official split that has no test rows, the share of its "
                                 "training rows carved out.")
    # Fix it to vary only the training seed over one split, e.g. to share one diffusion model across a
    # benchmark's seeds.
    split_seed: Optional[int] = Field(None, ge=0, description="Seed of the train/validation/test split (and of "
                                      "digits_lt's subsample); unset: the run's seed.")
    on_bad_image: Literal["error", "skip"] = Field("error", description="What a missing or unreadable image does: "
                                                   "stop with an error naming it, or skip it and list it in the log.")
    num_threads: int = Field(4, ge=1, description="Threads that decode and resize the images while the dataset "
                             "is read.")
    # Off, so that a CSV from elsewhere cannot pull in files the user did not mean.
    allow_outside_root: bool = Field(False, description="Read CSV image paths that lead outside data.root (or the "
                                     "CSV's folder): `..`, absolute paths and symlinks.")

    @model_validator(mode="after")
    def _needs_root(self):
        if self.name not in ("digits_lt", "csv") and not self.root:
            raise ValueError(f"data.root is required for data.name={self.name!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.val_fraction + data.test_fraction must be < 1")
        return self


class ModelConfig(_Strict):
    name: str = Field("resnet18", description="The classifier's architecture: any timm model name (random "
                      "weights unless model.pretrained, model.pretrained_file or model.weights is set).")
    weights: Optional[str] = Field(None, description="A whole model's weights (.safetensors or a .pth state dict, "
                                   "e.g. another run's best_model.safetensors) as a local path or filesystem URI; "
                                   "a head of another class count is replaced.")
    pretrained: bool = Field(False, description=(
        "Start from timm's pretrained weights for model.name (ImageNet for resnet50), fetched by timm "
        "on first use and cached; on a machine without network give model.pretrained_file instead."))
    pretrained_file: Optional[str] = Field(None, description=(
        "A local .safetensors/.pth file (or filesystem URI) of timm's pretrained weights for model.name, "
        "loaded through timm's own pretrained path with the classifier head replaced; implies pretrained."))
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout rate before the classifier head "
                             "(timm's drop_rate).")

    @field_validator("name")
    @classmethod
    def _no_hub_download(cls, v: str) -> str:
        # timm fetches an "hf-hub:" model's config from the Hugging Face Hub even without pretrained
        # weights; runs here stay offline, and weights come from a local file.
        if v.startswith("hf-hub:"):
            raise ValueError(f"model.name {v!r} would be downloaded from the Hugging Face Hub; name the timm "
                             f"architecture (e.g. resnet50) and give its weights as a local file in model.weights")
        return v

    @model_validator(mode="after")
    def _one_source_of_weights(self) -> "ModelConfig":
        if self.weights and (self.pretrained or self.pretrained_file):
            raise ValueError("model.weights and model.pretrained/model.pretrained_file both set: model.weights "
                             "already holds every tensor; keep one")
        return self


class AugmentConfig(_Strict):
    crop_scale: tuple[float, float] = Field((0.7, 1.0), description="Area range [low, high] of the random "
                                            "resized crop of each training image; [1, 1] disables cropping.")
    hflip: bool = Field(True, description="Flip training images horizontally at random.")
    vflip: bool = Field(False, description="Flip training images vertically at random (natural for dermoscopy "
                        "and fundus images, not for digits).")
    color_jitter: float = Field(0.0, ge=0.0, description="Strength s of random brightness, contrast and "
                                "saturation changes (factors in [1 - s, 1 + s]); 0 disables them.")

    @field_validator("crop_scale")
    @classmethod
    def _area_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"train.augment.crop_scale {list(v)} must be [low, high] with 0 < low <= high <= 1")
        return v


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=1, description="Training epochs of the classifier.")
    batch_size: int = Field(64, ge=1, description="Images per batch on each training worker.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="The optimizer (SGD with Nesterov momentum when "
                                               "train.momentum > 0, or AdamW).")
    lr: float = Field(0.05, gt=0.0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (sgd only).")
    weight_decay: float = Field(5e-4, ge=0.0, description="Weight decay of the optimizer.")
    schedule: Literal["cosine", "multistep", "constant"] = Field("cosine", description="Learning-rate schedule "
                                                                 "after the warm-up.")
    milestones: list[int] = Field(default_factory=list, description="For schedule=multistep: the epochs at which "
                                  "the learning rate is multiplied by train.gamma.")
    gamma: float = Field(0.1, gt=0.0, description="For schedule=multistep: the factor applied at each milestone.")
    warmup_epochs: int = Field(0, ge=0, description="Epochs of linear warm-up from a tenth of train.lr before the "
                               "schedule starts.")
    max_batches_per_epoch: Optional[int] = Field(None, ge=1, description="Stop each epoch after this many batches "
                                                 "(for smoke tests); unset: every batch.")
    # Off: a finished run is never resumed, and its weights and results are files of their own.
    keep_checkpoints: bool = Field(False, description="Keep a finished run's checkpoints (and an early-stopped "
                                   "search trial's) instead of removing them.")
    # Off by default: real rows already arrive in a new random order every epoch, and a buffer holds
    # back the synthetic images, which join it behind the rows it holds (benchmarks/log/2026-11-27.md).
    shuffle_buffer: int = Field(0, ge=0, description="Rows each worker mixes before batching (Ray Data's local "
                                "shuffle buffer); 0: none.")
    # None: bf16 where the device computes in bf16 natively (CUDA from Ampere on), else fp32
    # (ioisray/precision.py).
    precision: Optional[Literal["bf16", "fp16", "fp32"]] = Field(None, description="Autocast precision of "
                                                                 "classifier training and diffusion pretraining "
                                                                 "(fp16 on CUDA only); unset: bf16 where the device "
                                                                 "runs it natively, else fp32.")
    max_failures: int = Field(3, ge=0, description="Worker failures a run survives: Ray Train restarts the workers "
                              "from the run's last checkpoint.")
    channels_last: bool = Field(False, description="Use the channels-last (NHWC) memory format, faster for "
                                "convolutions on tensor cores.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentation of the training "
                                   "images, run per batch on the training device.")

    @model_validator(mode="after")
    def _milestones_after_warmup(self):
        if self.schedule == "multistep" and any(m <= self.warmup_epochs for m in self.milestones):
            raise ValueError(f"train.milestones {self.milestones} must all be after train.warmup_epochs "
                             f"({self.warmup_epochs})")
        return self


class MethodConfig(_Strict):
    loss: Literal["ce", "weighted_ce", "focal", "cb_focal", "ldam_drw", "balanced_softmax",
                  "logit_adjusted"] = Field("ce", description="The training loss: cross-entropy or one of the "
                                            "class-imbalance losses of ioisray/losses.py.")
    sampling: Literal["natural", "class_balanced"] = Field("natural", description="How real training images are "
                                                           "drawn: each once per epoch, or re-sampled to equal "
                                                           "counts per class (a fresh sample each epoch).")
    mixup_alpha: float = Field(0.0, ge=0.0, description="Beta(alpha, alpha) parameter of mixup, with any loss; "
                               "0 disables mixup.")
    focal_gamma: float = Field(2.0, ge=0.0, description="Focusing parameter gamma of the focal and class-balanced "
                               "focal losses.")
    cb_beta: float = Field(0.9999, gt=0.0, lt=1.0, description="Beta of the effective number of images per class, "
                           "for the class-balanced focal loss's weights.")
    weight_power: float = Field(1.0, ge=0.0, description="For weighted_ce: class weights proportional to "
                                "(1 / n_c) to this power.")
    ldam_max_margin: float = Field(0.5, gt=0.0, description="LDAM's largest margin (that of the rarest class; "
                                   "margins go as n_c^-1/4).")
    ldam_scale: float = Field(30.0, gt=0.0, description="LDAM's scale s applied to the cosine logits.")
    drw_epoch: Optional[int] = Field(None, ge=0, description="Epoch from which LDAM-DRW re-weights classes; "
                                     "unset: 80% of train.epochs, as in LDAM-DRW.")
    drw_beta: float = Field(0.9999, gt=0.0, lt=1.0, description="Beta of the class-balanced weights of LDAM-DRW's "
                            "deferred re-weighting.")
    la_tau: float = Field(1.0, ge=0.0, description="Temperature tau of the logit-adjusted loss (logits + tau * "
                          "log prior).")
    # real: an ablation of counting the distribution actually trained on.
    prior_counts: Literal["real_and_synthetic", "real"] = Field(
        "real_and_synthetic", description="The class counts of a count-based loss under IOIS: the epoch's real plus "
        "synthetic images per class, or the real training split's only.")


class RayConfig(_Strict):
    address: Optional[str] = Field(None, description="The Ray cluster to join (\"auto\" inside a cluster or a "
                                   "`ray job submit` job); unset: start a private local Ray.")
    num_workers: int = Field(2, ge=0, description="Ray Train (DDP) workers; 0 runs the training loop in the driver "
                             "process, without Ray Train.")
    use_gpu: bool = Field(False, description="Put each Ray Train worker on a GPU of its own (NCCL).")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs each Ray Train worker asks for (and its torch "
                                   "threads).")
    # The synthesis actors ask for synthesis.resources.
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each "
                                                   "training worker asks for, e.g. {train_gpu: 1} to keep it on "
                                                   "cluster.yaml's training nodes.")
    local_num_cpus: Optional[int] = Field(None, ge=1, description="Logical CPUs of a private local Ray; unset: "
                                          "twice the machine's cores (or what the run needs, if more).")
    object_store_mb: Optional[int] = Field(None, ge=64, description="Object store of a private local Ray in MB; "
                                           "unset: sized from the run's images (recipes/launch.py).")
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
    preset: Literal["tiny", "small32", "small64", "adm128"] = Field("tiny", description="Size of a newly "
                                                                    "pretrained class-conditional UNet.")
    image_size: Optional[int] = Field(None, ge=8, le=1024, description="Side in pixels of the images the diffusion "
                                      "model makes; unset: the preset's size.")
    model_dir: Optional[str] = Field(None, description="A trained diffusers UNet2DModel folder (e.g. <run>/unet) "
                                     "to sample from, or to fine-tune in pretrain-diffusion; unset: a run "
                                     "pretrains one.")
    # A model in model_dir carries its own, which sampling uses; fine-tuning it under a different one
    # is an error.
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = Field(
        None, description="What a newly pretrained model predicts, the noise or the velocity; unset: epsilon, "
        "as the paper's ADM.")
    beta_schedule: Optional[Literal["linear", "squaredcos_cap_v2"]] = Field(
        None, description="Noise schedule of a newly pretrained model, linear or cosine; unset: linear.")
    # 0: no null class.
    label_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Pretraining replaces a label by the null class "
                                 "with this probability, so the model also learns the unconditional prediction "
                                 "that classifier-free guidance needs.")


class PretrainConfig(_Strict):
    epochs: int = Field(30, ge=1, description="Pretraining epochs of the diffusion model.")
    batch_size: int = Field(64, ge=1, description="Images per batch on each pretraining worker.")
    lr: float = Field(2e-4, gt=0.0, description="AdamW learning rate (constant after the warm-up).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(200, ge=0, description="Optimizer steps of linear learning-rate warm-up.")
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0, description="Decay of the exponential moving average of the "
                             "weights, which are the ones saved.")
    hflip: bool = Field(True, description="Flip pretraining images horizontally at random.")
    vflip: bool = Field(False, description="Flip pretraining images vertically at random.")
    sample_every: int = Field(5, ge=0, description="Epochs between sample grids written to TensorBoard; 0: only "
                              "at the end.")
    sample_steps: int = Field(25, ge=1, description="DDIM steps of those sample grids.")
    # To judge samples against training length (benchmarks/judge_curve.sh).
    snapshot_every: int = Field(0, ge=0, description="Epochs between EMA model folders kept in "
                                "<run>/snapshots/epoch_<n> (the last epoch's is <run>/unet); 0: none.")
    max_batches_per_epoch: Optional[int] = Field(None, ge=1, description="Stop each epoch after this many batches "
                                                 "(for smoke tests); unset: every batch.")


class AASConfig(_Strict):
    """Accuracy Adaptive Sampling: n_c = budget * softmax((1 - a_c) / temperature)."""

    enabled: bool = Field(True, description="Share the synthesis budget by last epoch's per-class accuracy; "
                          "false: uniform quotas every epoch (the IOIS-without-AAS ablation).")
    temperature: float = Field(1.0, gt=0.0, description="Softmax temperature T of the quotas: lower puts more of "
                               "the budget on the weakest classes.")
    floor: int = Field(0, ge=0, description="Synthetic images every class gets at least, each epoch.")


MAX_BUDGET = 10_000_000  # synthetic images an epoch


class SynthesisConfig(_Strict):
    """Where the synthetic images come from and how many (see ioisray/synthesis/)."""

    mode: Literal["none", "online", "offline"] = Field("none", description="Synthetic images: none, online "
                                                       "(IOIS: made anew every epoch) or offline (one set, made once "
                                                       "and reused every epoch).")
    # At most MAX_BUDGET: the epoch's plan holds a label and a seed per image in memory, and a billion
    # (a typo) would need about 16 GB before anything is made.
    budget: Union[int, Literal["balance"]] = Field(0, description=(
        "Synthetic images per epoch (an integer N >= 0, at most 10,000,000, needed when synthesis.mode is not "
        "none), or `balance`: each class gets the largest class's count less its own (of the training split), "
        "every epoch, at most synthesis.max_budget in all."))
    max_budget: Optional[int] = Field(None, ge=1, le=MAX_BUDGET, description=(
        "The most synthetic images an epoch that synthesis.budget=balance may ask for; over it, the quotas "
        "shrink in proportion; unset: 10,000,000, the limit of any budget."))
    guidance: bool = Field(True, description="Guide sampling by the classifier being trained (online only).")
    chunk_size: int = Field(32, ge=1, description="Images per synthesis actor call and per Ray Data block.")
    pool_size: int = Field(2, ge=1, description="Synthesis actors in the pool.")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs each synthesis actor asks for (and its torch threads "
                            "when it has no GPU).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs each synthesis actor asks for; a fraction shares a GPU "
                            "between actors.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each synthesis "
                                        "actor asks for, e.g. {synthesis_gpu: 1} to place the pool on a cluster's "
                                        "synthesis nodes.")
    max_retries: int = Field(3, ge=0, description="Times one chunk is made again after its actor died.")
    # An autoscaler adds a node in minutes; failing here comes before Ray Train's 30-minute collective
    # time-out would.
    start_timeout_s: float = Field(1200.0, gt=0.0, description="Seconds the synthesis actors may wait for a node "
                                   "with room for them before the run fails, saying so.")
    # After a head start (one slice, or what fills the shuffle buffers).
    pace_real_reads: bool = Field(True, description="Read real rows into the stream as the synthetic chunks are "
                                  "made, so the chunks do not queue behind every real row; false reads them all "
                                  "at once.")
    filter: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Drop a synthetic image to which the judge (the live classifier, or synthesis.filter_model) gives less "
        "than this probability of its class; 0 keeps every image."))
    filter_model: Optional[str] = Field(None, description=(
        "A finished `ioisray train` run folder (local or a URI) whose best model judges for synthesis.filter, "
        "from the first epoch on; unset: the classifier being trained, as it ended the previous epoch."))
    loss_weight: float = Field(1.0, gt=0.0, le=1.0, description=(
        "A synthetic image's weight in the training loss, a real image's being 1 (the batch's loss is the "
        "weighted mean); 1 trains on both alike, as before."))

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_value(cls, v):
        # One message for both forms (pydantic would list a failure per member of the union).
        if v == "balance":
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError("synthesis.budget must be an integer >= 0 or 'balance'")
        return v

    @model_validator(mode="after")
    def _filter_has_a_judge(self):
        if self.filter_model and not self.filter:
            raise ValueError("synthesis.filter_model judges for synthesis.filter, which is 0 (off): set a threshold")
        if self.mode == "offline" and self.filter and not self.filter_model:
            raise ValueError("synthesis.filter with synthesis.mode=offline needs synthesis.filter_model: the offline "
                             "set is made before the classifier has trained, so it cannot judge it")
        return self

    @model_validator(mode="after")
    def _budget_when_on(self):
        if self.budget == "balance":
            return self
        if self.max_budget is not None:
            raise ValueError(f"synthesis.max_budget caps synthesis.budget=balance only; with "
                             f"synthesis.budget={self.budget} leave it unset")
        if self.mode != "none" and self.budget < 1:
            raise ValueError(f"synthesis.budget must be >= 1 when synthesis.mode is {self.mode!r}")
        if self.budget > MAX_BUDGET:
            raise ValueError(f"synthesis.budget={self.budget} is more than {MAX_BUDGET:,} images an epoch (the paper "
                             f"makes 2,000; at about 6 images/s per GPU, 10 million take about 20 GPU-days)")
        return self


class SearchDimension(_Strict):
    """One searched key: exactly one of `grid` (every value, crossed with the other grid keys),
    `choice` (one value drawn per trial), `uniform` / `loguniform` ([low, high]) or `randint` ([low, high))."""

    grid: Optional[list[Any]] = Field(None, description="Every listed value, crossed with the other grid keys.")
    choice: Optional[list[Any]] = Field(None, description="One of the listed values, drawn per trial.")
    uniform: Optional[tuple[float, float]] = Field(None, description="A value drawn uniformly from [low, high] "
                                                   "per trial.")
    loguniform: Optional[tuple[float, float]] = Field(None, description="A value drawn log-uniformly from "
                                                      "[low, high] per trial (low > 0).")
    randint: Optional[tuple[int, int]] = Field(None, description="An integer drawn from [low, high) per trial.")

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

    search_space: dict[str, SearchDimension] = Field(default_factory=dict, description="The searched config "
                                                     "keys, each with one way to pick its values, e.g. "
                                                     "{aas.temperature: {grid: [0.5, 2]}}.")
    num_samples: int = Field(1, ge=1, description="Repeats of the grid; each repeat draws the random keys anew.")
    metric: Literal["val_balanced_accuracy", "val_macro_f1", "val_accuracy"] = Field(
        "val_balanced_accuracy", description="The validation metric trials are stopped and ranked on.")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="Trial scheduler: ASHA stops weak trials early; "
                                               "fifo runs every trial to the end.")
    grace_period: int = Field(2, ge=1, description="Epochs every trial runs before ASHA may stop it.")
    reduction_factor: float = Field(3.0, gt=1.0, description="ASHA's reduction factor: about 1 in this many trials "
                                    "goes on at each rung.")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="Trials running at once; unset: as many as "
                                                 "the cluster can hold.")
    max_failures: int = Field(2, ge=0, description="Retries of a failed trial, each resuming from its last "
                              "checkpoint.")
    search_seed: int = Field(0, description="Seed of the draws of choice and of the ranges.")


class BenchmarkSettings(_Strict):
    """`ioisray benchmark`: methods x seeds (x datasets), each run an ordinary `ioisray train` run."""

    methods: dict[str, list[str]] = Field(default_factory=dict, description="The methods compared: name -> "
                                          "key=value overrides of this config.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="The seeds every method runs with.")
    datasets: dict[str, list[str]] = Field(default_factory=dict, description="Datasets to run every method on: "
                                           "name -> data.* overrides; empty: this config's data.")
    baseline: Optional[str] = Field(None, description="A method name that the per-class change figures and the "
                                    "paired differences compare every other method with.")
    # A pair with a method not in `methods` (a grid narrowed on the command line) is left out.
    compare: list[tuple[str, str]] = Field(default_factory=list, description="Further [method, other method] "
                                           "pairs whose paired differences are tabulated.")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="Runs at once; unset: as many as the "
                                                 "cluster can hold.")
    max_failures: int = Field(2, ge=0, description="Retries of a failed run, each resuming from its last checkpoint.")

    @model_validator(mode="after")
    def _baseline_is_a_method(self):
        if self.baseline is not None and self.baseline not in self.methods:
            raise ValueError(f"benchmark.baseline {self.baseline!r} is not one of benchmark.methods "
                             f"{sorted(self.methods)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"benchmark.seeds has repeats: {self.seeds}")
        return self


class Config(_Strict):
    name: str = Field("run", description="The run's name: outputs go to <output_dir>/<name>, and running the "
                      "same name again resumes that run.")
    seed: int = Field(0, description="Seed of the training run (and of the data split unless data.split_seed is "
                      "set).")
    output_dir: str = Field("outputs", description="Where runs are written: a local folder, or a pyarrow "
                            "filesystem URI (s3://bucket/prefix, gs://..., file:///...).")
    data: DataConfig = Field(default_factory=DataConfig, description="The dataset, its image size and its "
                             "train/validation/test split.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The classifier network.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="How the classifier is trained.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="The imbalance method: loss, "
                                 "re-sampling and mixup.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where and on how many Ray Train workers a run "
                           "trains.")
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig, description="The class-conditional "
                                       "diffusion model that makes the synthetic images.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="How the diffusion model is "
                                     "pretrained (ioisray pretrain-diffusion, or before a run that needs one).")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="The guided sampler that makes "
                                   "synthetic images (ioisray/sampler_config.py).")
    aas: AASConfig = Field(default_factory=AASConfig, description="Accuracy Adaptive Sampling: how each epoch's "
                           "synthesis budget is shared among the classes.")
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig, description="Where the synthetic images "
                                       "come from, how many, and the pool of synthesis actors.")
    # A config's run is trained first if it has not finished.
    baseline: Optional[str] = Field(None, description="What the per-class change figure compares test accuracy "
                                    "with at the end: a finished run's folder, or an experiment config (.yaml).")
    tune: TuneSettings = Field(default_factory=TuneSettings, description="The search of ioisray tune (read by "
                               "that command only).")
    benchmark: BenchmarkSettings = Field(default_factory=BenchmarkSettings, description="The grid of ioisray "
                                         "benchmark (read by that command only).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("name must be a plain folder name (no '/', not starting with '.')")
        return v

    @model_validator(mode="after")
    def _cfg_needs_a_null_class(self):
        # The model a run pretrains for itself learns the null class only with label dropout; a given
        # model_dir is checked when it is read (recipes/prerequisites.check_cfg_scale).
        if (self.synthesis.mode != "none" and self.sampler.cfg_scale != 1 and not self.diffusion.model_dir
                and not self.diffusion.label_dropout):
            raise ValueError(f"sampler.cfg_scale={self.sampler.cfg_scale:g} needs a diffusion model with a null class: "
                             f"set diffusion.label_dropout > 0 (e.g. 0.1) so that the model pretrained for this run "
                             f"learns one, or diffusion.model_dir to such a model")
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
