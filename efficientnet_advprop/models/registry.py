"""Model registry: ``build_model("efficientnet-b0", ...)`` is the public entry point.

Each family registers its names with a builder ``builder(model_name, num_classes=...,
norm=..., **kwargs) -> keras.Model`` and its default image size and batch-norm settings.
"""

from typing import Callable, NamedTuple

from efficientnet_advprop.models import efficientnet as _efficientnet
from efficientnet_advprop.models import nf_resnet as _nf_resnet
from efficientnet_advprop.models import resnet as _resnet
from efficientnet_advprop.models.normalization import make_normalizer


class ModelSpec(NamedTuple):
    builder: Callable
    image_size: int
    batch_norm_momentum: float
    batch_norm_epsilon: float
    normalized: bool = True  # False: the family has no normalisation layers (NF nets)


_REGISTRY = {}


def register_model(model_name, builder, *, image_size, batch_norm_momentum=0.99,
                   batch_norm_epsilon=1e-3, normalized=True, overwrite=False):
    """Registers `builder` under `model_name` (ValueError if taken, unless overwrite)."""
    if model_name in _REGISTRY and not overwrite:
        raise ValueError(f"model name {model_name!r} is already registered")
    _REGISTRY[model_name] = ModelSpec(builder, int(image_size), float(batch_norm_momentum),
                                      float(batch_norm_epsilon), bool(normalized))


def is_normalizer_free(model_name):
    """True for families without normalisation layers (no BN to route or strip)."""
    return not _spec(model_name).normalized


def model_names():
    """All registered model names, in registration order."""
    return list(_REGISTRY)


def _spec(model_name):
    try:
        return _REGISTRY[model_name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model name {model_name!r}; choose from "
                         f"{', '.join(_REGISTRY)}") from None


def default_image_size(model_name):
    """The resolution the model was designed for (EfficientNet's scaling table)."""
    return _spec(model_name).image_size


def build_model(model_name, num_classes=1000, *, norm=None, normalizer="batch_norm",
                num_aux=0, batch_norm_momentum=None, batch_norm_epsilon=None,
                synchronized=False, sync_group_size=None, **kwargs):
    """Builds a registered model.

    Args:
      model_name: a name from `model_names()` (``efficientnet-b0`` ...).
      num_classes: number of logits.
      norm: a normaliser factory ``norm(name) -> layer``; when given, `normalizer`,
        `num_aux` and the batch-norm settings must be left at their defaults.
      normalizer: kind passed to `make_normalizer` (batch_norm, split_batch_norm,
        keras_batch_norm, group_norm, instance_norm, none).
      num_aux: auxiliary BN sets (AdvProp uses 1).
      batch_norm_momentum, batch_norm_epsilon: None for the family's defaults
        (EfficientNet: 0.99, 1e-3; ResNet: 0.9, 1e-5). Normalizer-free families
        (nf-resnet-*) accept no normaliser settings.
      synchronized: average batch-norm statistics over replicas.
      sync_group_size: with `synchronized`, replicas per averaging group (None: all);
        see `SplitBatchNorm`.
      **kwargs: passed to the family's builder (image_size, preprocessing,
        dropout_rate, survival_prob, width_coefficient, depth_coefficient, ...).
    """
    spec = _spec(model_name)
    if not spec.normalized:
        if norm is not None or normalizer not in ("batch_norm", "none") or num_aux:
            raise ValueError(f"{model_name} is normalizer-free: it takes no normalizer "
                             f"(got normalizer={normalizer!r}, num_aux={num_aux})")
        return spec.builder(model_name, num_classes=num_classes, **kwargs)
    if norm is None:
        norm = make_normalizer(
            normalizer, num_aux=num_aux,
            momentum=(spec.batch_norm_momentum if batch_norm_momentum is None
                      else batch_norm_momentum),
            epsilon=(spec.batch_norm_epsilon if batch_norm_epsilon is None
                     else batch_norm_epsilon),
            synchronized=synchronized, sync_group_size=sync_group_size)
    elif (normalizer != "batch_norm" or num_aux or batch_norm_momentum is not None
          or batch_norm_epsilon is not None or synchronized
          or sync_group_size is not None):
        raise ValueError("pass either `norm` or the normalizer settings (normalizer, "
                         "num_aux, batch_norm_momentum, batch_norm_epsilon), not both")
    return spec.builder(model_name, num_classes=num_classes, norm=norm, **kwargs)


for _name, _params in _efficientnet.EFFICIENTNET_PARAMS.items():
    register_model(_name, _efficientnet.efficientnet, image_size=_params.resolution,
                   batch_norm_momentum=0.99, batch_norm_epsilon=1e-3)

for _name in _resnet.RESNET_NAMES:
    _size = (_resnet.SMALL_IMAGE_SIZE if _name.endswith(_resnet.CIFAR_SUFFIX)
             else _resnet.DEFAULT_IMAGE_SIZE)
    register_model(_name, _resnet.resnet, image_size=_size,
                   batch_norm_momentum=_resnet.BATCH_NORM_MOMENTUM,
                   batch_norm_epsilon=_resnet.BATCH_NORM_EPSILON)

for _name in _nf_resnet.model_names():
    register_model(_name, _nf_resnet.nf_resnet,
                   image_size=_nf_resnet.default_image_size(_name), normalized=False)
