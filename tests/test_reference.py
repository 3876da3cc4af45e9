"""Outputs are bitwise those of the code before the layout redesign: degrade, restore (gaussian on a 2-channel uint16
NGFF 0.4 image, randcnn mean+std, a trained 2.5D diffusion model's mean+std), train (weights) and convert.

numpy-only cases are bitwise the same on every machine. Cases that run torch kernels are bitwise only per CPU kind:
oneDNN picks different convolution kernels on AVX2 and AVX512 CPUs, whose float sums differ in the last bits. They
are recorded per torch CPU capability, each by running the pre-redesign commit 64c6808's tests/reference_outputs.py
on such a machine. One capability can hold several recordings (keys "AVX512 ..."): an AMD EPYC and an Intel Xeon
VM, both AVX512, give diffusion means that differ in the last bits with 64c6808 itself. A machine must match one of
its capability's recordings, or, of an unrecorded kind, any recording."""

import json

import pytest
import torch
from reference_outputs import REFERENCE, run_cases


@pytest.mark.slow
def test_outputs_bitwise_equal_to_recorded_reference(tmp_path):
    recorded = json.loads(REFERENCE.read_text())
    got = run_cases(tmp_path)
    for case, hashes in recorded["any_cpu"].items():
        assert got[case] == hashes, f"{case} changed: {got[case]} != {hashes}"
    by_cpu = recorded["torch_by_cpu"]
    torch_cases = {case: got[case] for case in next(iter(by_cpu.values()))}
    assert set(got) == set(recorded["any_cpu"]) | set(torch_cases)
    capability = torch.backends.cpu.get_cpu_capability()
    mine = [hashes for kind, hashes in by_cpu.items() if kind.split()[0] == capability]
    assert torch_cases in (mine or list(by_cpu.values())), (
        f"torch cases match no recording for {capability}: {torch_cases}")
