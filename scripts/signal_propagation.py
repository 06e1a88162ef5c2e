"""Signal propagation of a fresh NF-ResNet on CIFAR-10, with and without the x 2 shortcut.

    python scripts/signal_propagation.py --model=nf-resnet-26-cifar \\
        --output=results/signal_propagation/nf-resnet-26-cifar.json

Reads --num_images JPEGs (a seeded draw over all classes) from the CIFAR-10 tarball,
builds the NF-ResNet twice with the same initial weights -- the reference transition
shortcut (avg-pool -> 1x1 WS conv) and the one multiplied by 2 after the pool
(``compensate_avgpool_var``) -- and reports at the end of every residual block the
average channel squared mean and average channel variance (Brock et al. 2021), once
as initialised (last gain of every branch 0: blocks are the identity on their
shortcut) and once with those gains set to 1 (every branch active). Writes the JSON
to --output and a markdown table next to it (same name, .md). The images are 32 px
RGB in [0, 255]; the model normalises them (ImageNet mean/std).
"""

import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

flags.DEFINE_string("model", "nf-resnet-26-cifar",
                    "NF-ResNet name (nf_resnet.model_names).")
flags.DEFINE_string("data", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data",
                                         "cifar10-train-jpeg.tar.gz"),
                    "Tarball of JPEGs in class folders.")
flags.DEFINE_integer("num_images", 256, "Images drawn from the tarball.")
flags.DEFINE_integer("seed", 0, "Seed of the image draw and of the initialisation.")
flags.DEFINE_float("width_multiplier", 1.0, "Width of the network (1: published).")
flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
flags.DEFINE_string("output", "results/signal_propagation/signal_propagation.json",
                    "JSON path; the markdown table goes next to it with .md.")
FLAGS = flags.FLAGS


def read_jpegs(path, num_images, seed):
    """(uint8 [N, H, W, 3], member names): a seeded draw of `num_images` JPEGs."""
    import tensorflow as tf

    with tarfile.open(path, "r:gz") as tar:
        data = {m.name: tar.extractfile(m).read() for m in tar
                if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg"))}
    names = sorted(data)
    if num_images > len(names):
        raise ValueError(f"{path} holds {len(names)} JPEGs, fewer than {num_images}")
    chosen = sorted(np.random.default_rng(seed).choice(len(names), num_images,
                                                       replace=False))
    picked = [names[i] for i in chosen]
    images = np.stack([tf.io.decode_jpeg(data[n], channels=3).numpy() for n in picked])
    return images, picked


def _git_revision():
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, text=True, capture_output=True,
                               check=True).stdout.strip()
        return rev + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(result):
    lines = [f"# Signal propagation: {result['model']} at initialisation",
             "",
             f"{result['num_images']} CIFAR-10 training images (32 px, seed "
             f"{result['seed']}), width multiplier {result['width_multiplier']:g}, "
             f"git {result['git_revision']}.",
             f"Command: `{result['command']}`",
             "",
             "Per residual block output: average channel squared mean (sq mean) and "
             "average channel variance (var), Brock et al. 2021. *off*: reference "
             "transition shortcut (avg-pool -> 1x1 WS conv); *on*: pooled shortcut x 2 "
             "(`compensate_avgpool_var=True`). Branch var: variance of the last conv of "
             "the residual branch (before alpha).", ""]
    for setting, title in (("as_initialised", "As initialised (last branch gains 0)"),
                           ("active_branches", "Last branch gains set to 1")):
        stats = result[setting]
        lines += [f"## {title}", "",
                  "| block | sq mean off | var off | sq mean on | var on | var on/off "
                  "| branch var off | branch var on |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for off, on in zip(stats["off"], stats["on"]):
            ratio = (on["channel_var"] / off["channel_var"] if off["channel_var"]
                     else float("nan"))
            lines.append(
                f"| {off['block']} | {off['channel_sq_mean']:.4g} "
                f"| {off['channel_var']:.4g} "
                f"| {on['channel_sq_mean']:.4g} | {on['channel_var']:.4g} | {ratio:.3g} "
                f"| {off.get('branch_var', float('nan')):.4g} "
                f"| {on.get('branch_var', float('nan')):.4g} |")
        lines.append("")
    return "\n".join(lines)


def main(argv):
    del argv
    from efficientnet_advprop.models.signal import compare_pool_gain

    start = time.time()
    images, picked = read_jpegs(FLAGS.data, FLAGS.num_images, FLAGS.seed)
    classes = sorted({n.split("/")[-2] for n in picked})
    result = {
        "model": FLAGS.model,
        "num_images": len(images),
        "image_shape": list(images.shape[1:]),
        "classes_drawn": {c: sum(n.split("/")[-2] == c for n in picked) for c in classes},
        "seed": FLAGS.seed,
        "width_multiplier": FLAGS.width_multiplier,
        "data": os.path.basename(FLAGS.data),
        "git_revision": _git_revision(),
        "command": " ".join(["python", "scripts/signal_propagation.py"] + [
            f"--{name}={FLAGS[name].value}" for name in
            ("model", "num_images", "seed", "width_multiplier", "batch_size", "output")]),
    }
    for setting, active in (("as_initialised", False), ("active_branches", True)):
        result[setting] = compare_pool_gain(
            FLAGS.model, images.astype(np.float32),
            width_multiplier=FLAGS.width_multiplier, seed=FLAGS.seed,
            active_branches=active, batch_size=FLAGS.batch_size)
    result["seconds"] = round(time.time() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=1)
    md_path = os.path.splitext(FLAGS.output)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    print(f"wrote {FLAGS.output} and {md_path} in {result['seconds']} s")


if __name__ == "__main__":
    app.run(main)
