from setuptools import find_packages, setup

setup(
    name="omni",
    version="0.1.0",
    description="A JAX-native framework for the whole life of a GPT model.",
    python_requires=">=3.10",
    packages=find_packages(include=["omni", "omni.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "array-record",
        "sentencepiece",
        "ml-collections",
        "absl-py",
        "tqdm",
        "tensorboardX",
        "numpy",
        "matplotlib",  # experiments/scaling.py's plot
    ],
    extras_require={
        "test": ["pytest"],
        # Only for benchmarks/train_throughput.py's side-by-side reference run.
        "bench": ["torch==2.13.0", "transformers"],
    },
)
