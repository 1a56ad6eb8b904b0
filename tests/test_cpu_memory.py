"""The trainer keeps freed CPU memory: a step's large tensors are reused, not faulted in again."""

import subprocess
import sys

import pytest

# Allocates, touches and frees a 64 MiB tensor 40 times, as a training step does with its large
# activations, and prints the page faults of the last 8 times. With the heap retained, the first
# few allocations still grow it (the interpreter's small objects land in the freed block); it
# settled after 4-9 allocations in 20 runs here, so the last 8 of 40 leave a wide margin.
PROBE = """
import resource, sys, torch
from dinov2.utils.cpu_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-8:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator")
def test_large_tensors_are_reused_instead_of_faulted_in_every_step():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    pages = 64 * 2**20 // 4096
    assert faults("default") > 3 * pages  # glibc unmaps it at free: every page faults again
    assert faults("retain") < pages // 10
