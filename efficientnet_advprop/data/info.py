"""What a dataset is, for the config and both input paths (imports no TensorFlow)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str  # "embedded", "imagenet", "tfds:cifar10", "folder"
    num_classes: int
    num_train: int
    num_eval: int
    image_size: int  # native/suggested image size
    class_names: tuple = ()
    # > 0: the first holdout_shards train-* files are the eval split (TFRecord only).
    holdout_shards: int = 0
