"""efficientnet_advprop: AdvProp and its successors in Keras 3 + tf.distribute."""

from setuptools import find_packages, setup

setup(
    name="efficientnet_advprop",
    version="0.1.0",
    description=("Training system for AdvProp, Fast AdvProp, mixture-BN adversarial "
                 "training and NoFrost on Keras 3 and tf.distribute"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["efficientnet_advprop", "efficientnet_advprop.*"]),
    package_data={"efficientnet_advprop.data": ["embedded/*", "embedded/README.md"]},
    # ImageNet-C AlexNet errors and the ImageNet-A/R class subsets (third_party/README.md);
    # evaluation.distribution_shift finds them in the checkout or under sys.prefix/share.
    data_files=[
        ("share/efficientnet_advprop/third_party/imagenet_c",
         ["third_party/imagenet_c/alexnet_errors.json", "third_party/imagenet_c/NOTICE"]),
        ("share/efficientnet_advprop/third_party/imagenet_a_r",
         ["third_party/imagenet_a_r/imagenet_a.json", "third_party/imagenet_a_r/imagenet_r.json",
          "third_party/imagenet_a_r/LICENSE"]),
    ],
    include_package_data=True,
    install_requires=[
        # Tested with TF 2.21.0 / Keras 3.15.1 / TFDS 4.9.10 (docs/install.md, "Versions").
        "tensorflow>=2.18,<2.22",
        "keras>=3.8,<3.16",
        "tensorflow-datasets>=4.9",
        "tensorboard",  # tf.summary needs it; TF 2.21 no longer depends on it
        "absl-py>=1.0",
        "numpy",
        "matplotlib",  # the robustness report's plots
        "Pillow",  # the JAX engine's TF-free input path decodes images with it
    ],
    # jax: the JAX engine (KERAS_BACKEND=jax). test: -n 2 (the suite traces in Python)
    # and jax, since the tests check both engines.
    extras_require={"jax": ["jax>=0.4.34"],
                    "test": ["pytest>=7", "pytest-xdist>=3", "jax>=0.4.34"]},
    py_modules=["main"],
    entry_points={"console_scripts": ["efficientnet-advprop=main:console_main"]},
    license="Apache-2.0",
)
