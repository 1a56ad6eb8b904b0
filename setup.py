from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="dino_hier",
    version="0.1.0",
    description="DINOv2 for white blood cells with hierarchical cross-entropy (HCE)",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dinov2", "dinov2.*"]),
    package_data={"dinov2": ["configs/*.yaml", "configs/train/*.yaml"]},
    install_requires=requirements,
    # No "gpu" extra: every xformers release pins one torch version, so an unpinned xformers lets pip
    # replace the cluster's CUDA torch. README: "xformers (optional)" installs it against the torch in place.
    extras_require={
        "tensorboard": ["tensorboard>=2.10"],
        "wandb": ["wandb>=0.16"],
        "safetensors": ["safetensors>=0.4"],
        "umap": ["umap-learn>=0.5"],  # eval_hier's embedding.png by UMAP (else PCA)
        # test: the interop tests load exports with timm and read back safetensors and tensorboard files
        "test": ["pytest>=7", "timm>=1.0", "safetensors>=0.4", "tensorboard>=2.10"],
    },
)
