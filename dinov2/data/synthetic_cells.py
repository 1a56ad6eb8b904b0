"""Built-in demo data: procedurally generated white-blood-cell-like images, no downloads.

A round cell on a pale background with a few red blood cells. What a cell looks like follows its
place in the ``v1`` tree: appearance attributes (cell size, nucleus shape and nucleus/cytoplasm
ratio, chromatin, cytoplasm colour, granules) are set on lineages, maturity groups and cell types,
and a leaf inherits from its ancestors top-down (``APPEARANCE``), so siblings share most
attributes and distant nodes share few. Every image has its own random generator seeded by
(seed, source, class, image number), so a data set is byte-identical for a seed.

Two sources in one manifest: ``demo_fine`` labelled at leaves (``DEMO_LEAVES``) and
``demo_coarse`` labelled only at internal nodes (``DEMO_COARSE_NODES``; each image is a random
demo leaf below the node), the multi-granular situation of the paper.

    python -m dinov2.data.synthetic_cells --out demo_data [--n-per-class 24 --size 112 --seed 0]
"""

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from dinov2.config.custom_hier import get_tree
from dinov2.data.manifest import stratified_splits, write_manifest
from dinov2.errors import ConfigError
from dinov2.utils.cli import run_cli

DEMO_LEAVES = (
    "lymphocyte_typical",
    "plasma_cell",
    "lymphocyte_reactive",
    "erythroblast",
    "monoblast",
    "monocyte",
    "myeloblast",
    "promyelocyte",
    "myelocyte",
    "metamyelocyte",
    "neutrophil_band",
    "neutrophil_segmented",
    "eosinophil",
    "basophil",
)
DEMO_COARSE_NODES = ("neutrophil", "lymphocyte_mature", "granulocytic_immature")

NUCLEUS_SHAPES = ("round", "oval", "kidney", "band", "segmented", "bilobed")
GRANULE_DOTS = {  # (spacing px, radius px, density) at 112 px, scaled with the image size
    "fine": (3.0, 0.7, 0.45),
    "coarse_red": (6.5, 1.6, 0.9),
    "dark_purple": (8.0, 1.9, 0.7),
}

# Appearance per tree node; a leaf's appearance = DEFAULT_APPEARANCE updated by its lineage, then
# each deeper ancestor, then the leaf itself. Colours are RGB in [0, 1]; sizes are fractions of the
# image half-width (cell) or of the cell radius (nucleus, eccentricity); chromatin 0 = fine and
# pale (blasts) .. 1 = coarse and dark (mature cells).
DEFAULT_APPEARANCE = dict(
    cell_radius=0.6,
    nucleus="round",
    nc_ratio=0.6,
    eccentricity=0.0,
    chromatin=0.6,
    cytoplasm=(0.8, 0.76, 0.86),
    granules="none",
    granule_color=(0.7, 0.45, 0.6),
    halo=False,
)
APPEARANCE: dict[str, dict] = {
    # lineages
    "lymphopoiesis": dict(cell_radius=0.46, nc_ratio=0.8, chromatin=0.85, cytoplasm=(0.62, 0.72, 0.92)),
    "erythropoiesis": dict(cell_radius=0.42, nc_ratio=0.62, chromatin=1.0, cytoplasm=(0.74, 0.62, 0.72)),
    "monopoiesis": dict(cell_radius=0.74, nucleus="kidney", nc_ratio=0.6, chromatin=0.45, cytoplasm=(0.74, 0.74, 0.84)),
    "granulopoiesis": dict(cell_radius=0.62, granules="fine", cytoplasm=(0.9, 0.8, 0.84)),
    # maturity groups and intermediate nodes
    "lymphocyte_atypical": dict(cell_radius=0.62, nc_ratio=0.6, chromatin=0.6, cytoplasm=(0.52, 0.63, 0.92)),
    "monocytic_immature": dict(nucleus="round", nc_ratio=0.75, chromatin=0.15, cytoplasm=(0.58, 0.64, 0.9)),
    "granulocytic_immature": dict(cell_radius=0.72, chromatin=0.35, cytoplasm=(0.68, 0.7, 0.9)),
    "granulocytic_mature": dict(chromatin=0.9),
    "neutrophil": dict(granule_color=(0.78, 0.58, 0.7)),
    "eosinophil_group": dict(
        nucleus="bilobed",
        nc_ratio=0.55,
        granules="coarse_red",
        granule_color=(0.9, 0.42, 0.3),
        cytoplasm=(0.95, 0.78, 0.72),
    ),
    # leaves
    "plasma_cell": dict(cell_radius=0.56, nc_ratio=0.5, eccentricity=0.38, cytoplasm=(0.4, 0.48, 0.82), halo=True),
    "lymphocyte_reactive": dict(cell_radius=0.7, nc_ratio=0.5),
    "monoblast": dict(cell_radius=0.76),
    "myeloblast": dict(nc_ratio=0.8, chromatin=0.1, granules="none", cytoplasm=(0.56, 0.62, 0.88)),
    "promyelocyte": dict(
        nucleus="oval", nc_ratio=0.62, eccentricity=0.15, granules="coarse_red", granule_color=(0.55, 0.18, 0.42)
    ),
    "myelocyte": dict(nucleus="oval", nc_ratio=0.52, eccentricity=0.28, chromatin=0.55, cytoplasm=(0.84, 0.76, 0.86)),
    "metamyelocyte": dict(
        nucleus="kidney", nc_ratio=0.52, eccentricity=0.15, chromatin=0.7, cytoplasm=(0.88, 0.79, 0.85)
    ),
    "neutrophil_band": dict(nucleus="band", nc_ratio=0.62),
    "neutrophil_segmented": dict(nucleus="segmented", nc_ratio=0.66),
    "basophil": dict(
        nucleus="bilobed",
        nc_ratio=0.55,
        granules="dark_purple",
        granule_color=(0.22, 0.08, 0.32),
        cytoplasm=(0.82, 0.74, 0.88),
    ),
}

BACKGROUND = np.array([0.94, 0.89, 0.86])
RED_CELL = np.array([0.91, 0.7, 0.7])
NUCLEUS_PALE = np.array([0.62, 0.5, 0.76])
NUCLEUS_DARK = np.array([0.28, 0.14, 0.4])


def appearance(tree, name: str) -> dict:
    """Appearance of tree node ``name``: defaults updated from its lineage down to itself."""
    result = dict(DEFAULT_APPEARANCE)
    for node in tuple(reversed(tree.ancestors(name))) + (name,):
        result.update(APPEARANCE.get(node, {}))
    return result


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a (cells+1)^2 random grid, bilinearly interpolated with smoothstep."""
    grid = rng.random((cells + 1, cells + 1))
    position = np.linspace(0, cells, size, endpoint=False)
    lower = position.astype(int)
    fraction = position - lower
    fraction = fraction * fraction * (3 - 2 * fraction)
    top = grid[lower][:, lower] * (1 - fraction) + grid[lower][:, lower + 1] * fraction
    bottom = grid[lower + 1][:, lower] * (1 - fraction) + grid[lower + 1][:, lower + 1] * fraction
    return top * (1 - fraction[:, None]) + bottom * fraction[:, None]


def _dots(rng: np.random.Generator, size: int, spacing: float, radius: float, density: float) -> np.ndarray:
    """Round dots (antialiased, in [0, 1]): one per grid cell of ``spacing`` px with probability
    ``density``, centred uniformly in the middle half of its cell, of ``radius`` px (< spacing / 4)."""
    cells = int(math.ceil(size / spacing))
    centre = (rng.uniform(0.25, 0.75, (2, cells, cells)) + np.indices((cells, cells))) * spacing
    present = rng.random((cells, cells)) < density
    y, x = np.indices((size, size)) + 0.5
    row, column = (y // spacing).astype(int), (x // spacing).astype(int)
    distance = np.hypot(y - centre[0][row, column], x - centre[1][row, column])
    return _inside(distance - radius, 1.0) * present[row, column]


def _inside(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Antialiased indicator of ``distance < 0`` (signed distance, ``pixel`` = one pixel in its unit)."""
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _segment_distance(u, v, start, end):
    """Distance from points (u, v) to the segment start-end."""
    du, dv = end[0] - start[0], end[1] - start[1]
    t = np.clip(((u - start[0]) * du + (v - start[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.hypot(u - start[0] - t * du, v - start[1] - t * dv)


def _nucleus_distance(shape: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Signed distance (< 0 inside) of a nucleus of unit size in its own frame."""
    if shape == "round":
        return np.hypot(u, v) - 1.0
    if shape == "oval":
        return np.hypot(u / 1.12, v / 0.84) - 1.0
    if shape == "kidney":
        oval = np.hypot(u / 1.1, v / 0.86) - 1.0
        notch = 0.52 - np.hypot(u - 0.98, v)
        return np.maximum(oval, notch)
    radius = np.hypot(u, v)
    angle = np.arctan2(v, u)
    if shape == "band":
        gap = rng.uniform(0.5, 0.9)
        ends = [(0.68 * math.cos(gap), sign * 0.68 * math.sin(gap)) for sign in (1, -1)]
        along_arc = np.abs(radius - 0.68)
        to_end = np.minimum(np.hypot(u - ends[0][0], v - ends[0][1]), np.hypot(u - ends[1][0], v - ends[1][1]))
        return np.where(np.abs(angle) >= gap, along_arc, to_end) - 0.26
    if shape == "segmented":
        lobes = int(rng.integers(3, 5))
        spread = rng.uniform(1.8, 2.4)
        centres = [
            (0.62 * math.cos(a), 0.62 * math.sin(a))
            for a in np.linspace(-spread, spread, lobes) + rng.normal(0, 0.12, lobes)
        ]
        distance = np.min([np.hypot(u - cu, v - cv) - 0.36 for cu, cv in centres], axis=0)
        for start, end in zip(centres[:-1], centres[1:]):
            distance = np.minimum(distance, _segment_distance(u, v, start, end) - 0.06)
        return distance
    if shape == "bilobed":
        left, right = (-0.48, rng.normal(0, 0.08)), (0.48, rng.normal(0, 0.08))
        lobes = np.minimum(np.hypot(u - left[0], v - left[1]), np.hypot(u - right[0], v - right[1])) - 0.5
        return np.minimum(lobes, _segment_distance(u, v, left, right) - 0.16)
    raise ConfigError(f"unknown nucleus shape {shape!r}; known: {', '.join(NUCLEUS_SHAPES)}")


def render_cell(look: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """One size x size RGB image of a cell with appearance ``look`` (see ``DEFAULT_APPEARANCE``)."""
    pixel = 2.0 / size
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    image = BACKGROUND * rng.uniform(0.97, 1.02) + (_value_noise(rng, size, 4)[..., None] - 0.5) * 0.04

    for _ in range(int(rng.integers(2, 5))):  # red blood cells in the background
        angle, reach = rng.uniform(0, 2 * math.pi), rng.uniform(0.75, 1.05)
        radius = rng.uniform(0.3, 0.42)
        distance = np.hypot(x - reach * math.cos(angle), y - reach * math.sin(angle))
        disc = _inside(distance - radius, pixel)
        pale_centre = _inside(distance - 0.45 * radius, 4 * pixel) * 0.35
        colour = RED_CELL + (BACKGROUND - RED_CELL) * pale_centre[..., None]
        image = image + (colour - image) * disc[..., None]

    cell_radius = look["cell_radius"] * rng.uniform(0.92, 1.08)
    rotation = rng.uniform(0, 2 * math.pi)
    centre = rng.normal(0, 0.04, 2)
    cos, sin = math.cos(rotation), math.sin(rotation)
    u = ((x - centre[0]) * cos + (y - centre[1]) * sin) / cell_radius
    v = (-(x - centre[0]) * sin + (y - centre[1]) * cos) / cell_radius
    stretch = rng.uniform(0.92, 1.08)
    outline = 1 + 0.03 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 6.3))
    cell = _inside(np.hypot(u * stretch, v / stretch) - outline, pixel / cell_radius)

    nc_ratio = look["nc_ratio"] * rng.uniform(0.93, 1.07)
    direction = rng.uniform(0, 2 * math.pi)
    shift = min(look["eccentricity"], max(0.0, 0.95 - nc_ratio))  # the nucleus stays inside the cell
    offset = shift * np.array([math.cos(direction), math.sin(direction)])
    nucleus_u, nucleus_v = (u - offset[0]) / nc_ratio, (v - offset[1]) / nc_ratio
    nucleus_distance = _nucleus_distance(look["nucleus"], nucleus_u, nucleus_v, rng)
    nucleus = _inside(nucleus_distance, pixel / (cell_radius * nc_ratio)) * cell

    cytoplasm_colour = np.clip(np.array(look["cytoplasm"]) + rng.normal(0, 0.015, 3), 0, 1)
    cytoplasm_shade = 1 + (_value_noise(rng, size, 6)[..., None] - 0.5) * 0.08
    cytoplasm = cytoplasm_colour * cytoplasm_shade
    if look["halo"]:
        halo = _inside(nucleus_distance - 0.3, pixel / (cell_radius * nc_ratio)) * 0.45
        cytoplasm = cytoplasm + (1.0 - cytoplasm) * halo[..., None]
    image = image + (cytoplasm - image) * cell[..., None]

    if look["granules"] != "none":
        spacing, radius, density = GRANULE_DOTS[look["granules"]]
        granules = _dots(rng, size, spacing * size / 112, radius * size / 112, density) * cell
        if look["granules"] != "dark_purple":
            granules = granules * (1 - nucleus)
        granule_colour = np.array(look["granule_color"])
        image = image + (granule_colour - image) * (0.85 * granules)[..., None]

    chromatin = look["chromatin"]
    nucleus_colour = NUCLEUS_PALE + (NUCLEUS_DARK - NUCLEUS_PALE) * chromatin
    clumps = _value_noise(rng, size, max(4, int(size / (4 + 6 * chromatin))))[..., None] - 0.5
    nucleus_colour = nucleus_colour * (1 + clumps * (0.15 + 0.5 * chromatin))
    nucleus_opacity = nucleus * (0.6 if look["granules"] == "dark_purple" else 1.0)
    image = image + (nucleus_colour - image) * nucleus_opacity[..., None]

    image = image + rng.normal(0, 0.012, image.shape)
    return Image.fromarray(np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def render_demo_cell(name: str, size: int = 112, seed: int = 0, tree=None) -> Image.Image:
    """An image of tree node ``name`` (a leaf or an internal node's first demo leaf) for a seed."""
    if tree is None:
        tree = get_tree("v1")
    leaves = [leaf for leaf in DEMO_LEAVES if leaf in tree.leaves_under(name)]
    return render_cell(appearance(tree, leaves[0]), size, np.random.default_rng([seed, size]))


def generate_demo_dataset(
    out_dir,
    n_per_class: int = 24,
    size: int = 112,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    progress: bool = False,
) -> Path:
    """Write demo images under ``out_dir/images`` and the manifest ``out_dir/manifest.csv``; its path.

    ``demo_fine``: n_per_class images of each leaf of ``DEMO_LEAVES``; ``demo_coarse``:
    n_per_class images for each node of ``DEMO_COARSE_NODES``, labelled with the node. Splits are
    stratified per (source, label) and reproducible.
    """
    if n_per_class < 1 or size < 32:
        raise ConfigError(f"the demo data needs n_per_class >= 1 and size >= 32 px, got {n_per_class} and {size}")
    tree = get_tree("v1")
    out_dir = Path(out_dir)
    rows = []
    jobs = [("demo_fine", label, [label]) for label in DEMO_LEAVES]
    jobs += [
        ("demo_coarse", node, [leaf for leaf in DEMO_LEAVES if leaf in tree.leaves_under(node)])
        for node in DEMO_COARSE_NODES
    ]
    with tqdm(total=len(jobs) * n_per_class, desc="demo images", unit="img", disable=not progress) as bar:
        for source_number, (dataset, label, leaves) in enumerate(jobs):
            folder = out_dir / "images" / dataset / label
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(n_per_class):
                rng = np.random.default_rng([seed, source_number, number])
                leaf = leaves[int(rng.integers(len(leaves)))]
                path = folder / f"{label}_{number:04d}.png"
                render_cell(appearance(tree, leaf), size, rng).save(path, optimize=False)
                rows.append({"path": str(path), "label": label, "dataset": dataset, "leaf": leaf})
                bar.update()
    manifest = pd.DataFrame(rows)
    strata = (manifest["dataset"] + "/" + manifest["label"]).tolist()
    manifest["split"] = stratified_splits(strata, val_fraction, test_fraction, seed)
    return write_manifest(manifest[["path", "label", "dataset", "split", "leaf"]], out_dir / "manifest.csv")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.data.synthetic_cells",
        description="Generate the built-in demo data set (WBC-like images + manifest.csv).",
    )
    parser.add_argument(
        "--out", required=True, help="output folder; images go to OUT/images, the manifest to OUT/manifest.csv"
    )
    parser.add_argument(
        "--n-per-class",
        type=int,
        default=24,
        help="images per leaf (demo_fine) and per coarse node (demo_coarse); default 24",
    )
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files (default 0)"
    )
    args = parser.parse_args(argv)
    path = generate_demo_dataset(args.out, args.n_per_class, args.size, args.seed, progress=True)
    manifest = pd.read_csv(path)
    print(f"wrote {len(manifest)} images and {path}")
    print(manifest.groupby(["dataset", "split"]).size().unstack(fill_value=0).to_string())
    return 0


if __name__ == "__main__":
    run_cli(main)
