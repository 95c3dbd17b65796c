"""dks_jax: deep supervision and in-network knowledge transfer (DKS, DSN, DS, DHM) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="dks_jax",
    version="0.1.0",
    description="Deeply-supervised Knowledge Synergy and its family in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dks_jax", "dks_jax.*"]),
    python_requires=">=3.11",  # jax 0.10 needs 3.11
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "clu",
        "absl-py",
        "etils[epath]",
        "numpy",
        "pillow",
        "tensorflow-datasets",
        # clu's metric writers import tensorboard, which tensorflow-cpu>=2.21 no longer pulls in.
        "tensorboard",
        # tensorflow-datasets 4.9.10 imports importlib_resources without declaring it.
        "importlib_resources",
    ],
    extras_require={
        # TensorFlow is optional at run time (see DESIGN.md); the default install (`make`) adds it.
        "tf": ["tensorflow-cpu"],
        "test": ["pytest", "pytest-xdist", "ruff", "matplotlib"],
        "plots": ["matplotlib"],
        # gs:// paths without TensorFlow (with it, epath goes through tf.io.gfile).
        "gcs": ["gcsfs"],
    },
)
