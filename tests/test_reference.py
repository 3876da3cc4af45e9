"""Outputs are bitwise those of the code before the layout redesign: degrade, restore (gaussian on a 2-channel uint16
NGFF 0.4 image, randcnn mean+std, a trained 2.5D diffusion model's mean+std), train (weights) and convert."""

import json

from reference_outputs import REFERENCE, run_cases


def test_outputs_bitwise_equal_to_recorded_reference(tmp_path):
    expected = json.loads(REFERENCE.read_text())
    got = run_cases(tmp_path)
    assert set(got) == set(expected)
    for case in expected:
        assert got[case] == expected[case], f"{case} changed: {got[case]} != {expected[case]}"
