from setuptools import find_packages, setup

setup(
    name="omni",
    version="0.1.0",
    description="A JAX-native framework for the whole life of a GPT model.",
    python_requires=">=3.10",
    packages=find_packages(include=["omni", "omni.*"]),
    package_data={"omni": ["web/*.html"]},  # omni serve's page
    entry_points={"console_scripts": ["omni=omni.cli:main"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "array-record",
        "sentencepiece",
        "tokenizers",  # Hugging Face tokenizer.json (GPT-2's byte-level BPE), omni/interop/hf.py
        # Hugging Face weights, read and written through numpy: no torch. From 0.4.1 bfloat16 tensors load as
        # ml_dtypes' numpy bfloat16 (ml_dtypes comes with jax).
        "safetensors>=0.4.1",
        "ml-collections",
        "absl-py",
        "tqdm",
        "tensorboardX",
        "numpy",
        "matplotlib",  # experiments/scaling.py's plot
    ],
    extras_require={
        # torch and transformers: tests/test_hf.py checks logits against transformers' GPT-2. The pinned torch
        # is the CPU wheel; an unpinned one would pull GBs of CUDA libraries.
        # openai: tests/test_serve.py talks to omni.serve through the official client, selenium drives its page in
        # Debian's chromium (apt-get install chromium chromium-driver). pytest-xdist: the suite runs on two workers
        # (pytest.ini), one file per worker at a time, so that compiling on one core overlaps running on the other.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers", "openai", "selenium", "starlette", "uvicorn"],
        # omni.serve's HTTP server.
        "serve": ["starlette", "uvicorn"],
        # libtpu, at the jax version pip resolves for omni: compiles for any TPU slice ahead of time on any host
        # (omni/aot.py, `--config.dry_run=True`; tests/test_aot.py), and runs omni on a TPU VM.
        "tpu": ["jax[tpu]"],
        # Only for benchmarks/train_throughput.py's side-by-side reference run.
        "bench": ["torch==2.13.0", "transformers"],
    },
)
