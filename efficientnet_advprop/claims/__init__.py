"""Evidence that the system reproduces the papers: named claims, each a paired
comparison of runs under one budget, over several seeds (scripts/reproduce_claims.py).

  suite   the tiers (smoke / cpu / gpu), the runs and the claims
  runner  trains and evaluates one run, writes results/claims/<tier>/<run>/seed<k>.json
  report  turns the result files into results/claims/README.md, plots and verdicts
"""

import json
import os

from efficientnet_advprop.data.cifar_tar import SPLIT_FILE, read_tar, select, write_split

HELD_OUT_PER_CLASS = 500  # 5,000 held-out images, 45,000 for training
SPLIT_SEED = 0


def split_description():
    return (f"CIFAR-10 training images of ../shared/data: per class, the sorted file "
            f"names shuffled with random.Random({SPLIT_SEED}); the first "
            f"{HELD_OUT_PER_CLASS} are held out, the rest train")


def ensure_split(source, data_dir):
    """Builds the suite's fixed 45,000 / 5,000 split of `source` (the tar.gz of the
    CIFAR-10 training JPEGs) in `data_dir` once; returns its split.json dict."""
    path = os.path.join(data_dir, SPLIT_FILE)
    if os.path.exists(path):
        with open(path) as f:
            split = json.load(f)
        if split.get("description") == split_description():
            return split
        raise ValueError(f"{data_dir} holds another split ({split.get('description')}); "
                         f"choose an empty --data_dir")
    if not os.path.exists(source):
        raise ValueError(f"--source={source}: no such file (the CIFAR-10 JPEG tar.gz)")
    images = read_tar(source)
    class_names, train, evals = select(images, None, HELD_OUT_PER_CLASS, SPLIT_SEED,
                                       eval_first=True)
    os.makedirs(data_dir, exist_ok=True)
    return write_split(images, class_names, train, evals, data_dir, train_shards=16,
                       eval_shards=2, description=split_description())
