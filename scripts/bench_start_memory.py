"""Host memory of one rank starting the paper's run: SSLMetaArch (ViT-L/14, paper heads) from a
DinoBloom-format start file, built by the trainer's ``build_model``.

    python scripts/bench_start_memory.py [--weights DinoBloom-L.pth] [--arch vit_large]

Two start-ups, each in a fresh process, side by side:

* ``host build, private read``: the parameters built in host memory and the start file read into
  private memory (how every GPU rank started before: the model moved to the GPU only afterwards);
* ``host build, mapped read``: a CPU run now: the file memory-mapped, its pages shared by the
  node's processes (page cache);
* ``device build, mapped read``: what a GPU rank keeps in host memory now: the parameters are created on
  its device (here the meta device stands in for the GPU, so that the host share is what remains;
  the file's pages are then read as the copy to the GPU would read them).

Per start-up, sampled every 5 ms: the peak of private (anonymous) memory, which every rank of a
node pays, and the peak of file-backed pages mapped, which a node pays once (page cache). Without
``--weights`` a random DinoBloom-format file of the arch's backbone is written to a temporary folder.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from dinov2.config.custom_hier import get_tree
from dinov2.models import build_backbone
from dinov2.models import weights as weights_module
from dinov2.train.train import build_model
from dinov2.utils.config import load_config
from dinov2.utils.precision import Precision

MODES = {
    "host build, private read": {"device": "cpu", "mmap": False},
    "host build, mapped read": {"device": "cpu", "mmap": True},
    "device build, mapped read": {"device": "meta", "mmap": True},
}


def memory_kb() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def touch(value) -> None:
    """Read every tensor of a nested checkpoint (page them in) without copying it."""
    if isinstance(value, torch.Tensor):
        value.sum()
    elif isinstance(value, dict):
        for item in value.values():
            touch(item)


def start_up(weights: str, arch: str, device: str, mmap: bool) -> dict:
    """One rank's start in this process; the memory it took."""
    if not mmap:  # the read as it was: the whole file into private memory
        weights_module.zipfile.is_zipfile = lambda path: False
    baseline = memory_kb()
    peak = dict(baseline)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for key, value in memory_kb().items():
                peak[key] = max(peak[key], value)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    cfg = load_config("hier_vitl14", [f"student.arch={arch}", f"student.pretrained_weights={weights}"])
    model, _ = build_model(cfg, get_tree(cfg.supervised.hierarchy), torch.device(device), 1, Precision("fp32", "-"))
    if device == "meta":  # what copying the weights into GPU parameters reads
        touch(torch.load(weights, map_location="cpu", weights_only=True, mmap=True))
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "parameters_millions": round(n_params / 1e6, 1),
        "private_peak_gb": round((peak["RssAnon"] - baseline["RssAnon"]) / 2**20, 2),
        "file_pages_peak_gb": round((peak["RssFile"] - baseline["RssFile"]) / 2**20, 2),
        "seconds": round(seconds, 1),
    }


def write_start_file(arch: str, folder: Path) -> Path:
    backbone = build_backbone(arch, img_size=224, patch_size=14, init_values=1e-5)
    path = folder / f"random-dinobloom-{arch}.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a DinoBloom/DINOv2 start file (default: a random one)")
    parser.add_argument("--arch", default="vit_large", help="backbone arch (default vit_large, the paper's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one start-up, as JSON on stdout
    args = parser.parse_args()
    if args.child:
        print(json.dumps(start_up(args.weights, args.arch, **MODES[args.child])))
        return
    with tempfile.TemporaryDirectory() as folder:
        weights = args.weights or str(write_start_file(args.arch, Path(folder)))
        size_gb = Path(weights).stat().st_size / 2**30
        print(f"{args.arch}/14 with the paper's heads from {weights} ({size_gb:.2f} GB), one rank:")
        for mode in MODES:
            command = [sys.executable, __file__, "--weights", weights, "--arch", args.arch, "--child", mode]
            result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            print(
                f"  {mode:<26} private peak {result['private_peak_gb']:5.2f} GB (each rank), "
                f"file pages {result['file_pages_peak_gb']:4.2f} GB (once per node), "
                f"{result['parameters_millions']} M parameters, {result['seconds']} s"
            )


if __name__ == "__main__":
    main()
