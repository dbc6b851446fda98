"""tb-convviz: what each ConvNet unit learns, live in TensorBoard (Zeiler & Fergus, 2013)."""

import pathlib

from setuptools import setup

HERE = pathlib.Path(__file__).parent

setup(
    name="tb-convviz",
    version="0.1.0",
    description="TensorBoard plugin: top-k image patches per ConvNet unit over training (Zeiler & Fergus)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # frontend/ stays at the top level of the repo and ships inside the package.
    packages=["tb_convviz", "tb_convviz.plugin", "tb_convviz.demo", "tb_convviz._frontend"],
    package_dir={"tb_convviz._frontend": "frontend"},
    package_data={
        "tb_convviz": ["plugin_data.proto"],
        "tb_convviz.plugin": ["http_api.md"],
        "tb_convviz._frontend": ["*.js", "*.css", "*.svg"],
    },
    install_requires=[
        "tensorboard>=2.16",
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.23",
        "protobuf>=5.26",
        "pillow>=9",
        "tqdm>=4.60",
        "google-crc32c>=1.5",
    ],
    extras_require={
        "lightning": ["lightning>=2.0"],
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "hypothesis>=6.80",
            "playwright>=1.40",
            "werkzeug>=2",
            "lightning>=2.0",
            "timm>=0.9",
            # Checks that the convviz scalars are listed by a common third-party reader (pulls pandas).
            "tbparse>=0.0.8",
        ],
    },
    entry_points={
        "tensorboard_plugins": ["convviz = tb_convviz.plugin.loader:ConvVizLoader"],
        "console_scripts": ["tb-convviz = tb_convviz.cli:main"],
    },
)
