from setuptools import find_packages, setup

setup(
    name="bert4x",
    version="0.1.0",
    description="bert4keras's workflow on Keras 3: BERT, WoBERT, RoFormer, mT5 for Chinese NLP.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bert4x", "bert4x.*", "weights_converters"]),
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.10,<3.16",  # bert4x.models.Model overrides private parts of Keras's jax trainer
        "tensorflow>=2.18",
        "numpy",
        "jieba",
        "sentencepiece",
        "safetensors",
        "google-crc32c",
    ],
    extras_require={
        "test": [
            "pytest",
            "hypothesis",
            "jax",
            "torch==2.13.0",
            "transformers",
            "ruff",
            # the export and serving tests (same pins as the [export] extra)
            "onnx",
            "onnxruntime",
            "tf2onnx",
            "ai-edge-litert",
        ],
        # bert4x.export: ONNX (tf2onnx from tensorflow; jax exports go through a tensorflow process), ONNX Runtime
        # to run it, LiteRT's interpreter to run .tflite files
        "export": ["onnx", "onnxruntime", "tf2onnx", "ai-edge-litert"],
        # peers for benchmarks/ (not needed by the library or its tests)
        "bench": ["keras-hub==0.32.0", "jax", "torch==2.13.0", "transformers"],
    },
    entry_points={
        "console_scripts": [
            "bert4x-convert=weights_converters.convert:main",
            "bert4x-ls=weights_converters.list_variables:main",
        ],
    },
)
