"""The magnitude-preserving U-Net: no statistics over space (tile independence), unit scale at init, presets."""

import numpy as np
import pytest
import torch
from torch import nn

from volrestore.model import nets
from volrestore.errors import UserError

torch.set_num_threads(1)
SMALL_3D = {"spatial_dims": 3, "channels": 4, "channel_mult": [1, 2], "num_blocks": 1, "dropout": 0.0,
            "objective": "edm"}


def trained_like(net: nn.Module) -> nn.Module:
    """At init the noise embedding and the output gain are zero (EDM2), which would hide most of the net: give them
    the values a trained net has, so every path contributes."""
    torch.manual_seed(1)
    for m in net.modules():
        if isinstance(m, nets.Block):
            m.emb_gain.data.fill_(1.0)
    if hasattr(net, "out_gain"):
        net.out_gain.data.fill_(1.0)
    return net.eval()


def tile_mismatch(net, dims: int, channels: int, big: int, small: int, offset: int, radius: int) -> float:
    """Max |difference| ÷ output range between the net on a tile and on a larger tile containing it, over the voxels
    of the small tile whose receptive field (radius) lies inside both."""
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, channels, *[big] * dims, generator=g)
    x = torch.randn(1, 1, *[big] * dims, generator=g)
    inner = (slice(None), slice(None)) + (slice(offset, offset + small),) * dims
    with torch.no_grad():
        out_big = net(cond, x, torch.tensor([0.5]))
        out_small = net(cond[inner], x[inner], torch.tensor([0.5]))
    assert small > 2 * radius, "no voxel of the small tile has its receptive field inside it"
    keep = (slice(None), slice(None)) + (slice(radius, small - radius),) * dims
    a, b = out_big[inner][keep], out_small[keep]
    return float((a - b).abs().max() / (out_big.max() - out_big.min()))


@pytest.mark.parametrize("preset,big,small,offset", [("tiny-2d", 256, 192, 32), (SMALL_3D, 112, 96, 8)])
def test_no_spatial_statistics_tile_equals_larger_tile(preset, big, small, offset):
    cfg = nets.load_preset(preset)
    net = trained_like(nets.build(cfg))
    radius = nets.receptive_radius(cfg)
    assert offset % net.size_multiple == 0  # the engine's tile grid keeps pooling phases aligned the same way
    err = tile_mismatch(net, cfg["spatial_dims"], 1, big, small, offset, radius)
    assert err <= 1e-4, err


class GroupNormNet(nn.Module):
    """What MONAI's DiffusionModelUNet does inside: a GroupNorm, whose statistics span the whole tile."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, cond, x, c_noise):
        h = torch.cat([cond, x, torch.ones_like(x)], 1)
        return self.b(torch.relu(self.norm(self.a(h))))


def test_tile_check_catches_a_groupnorm_net():
    torch.manual_seed(0)
    err = tile_mismatch(GroupNormNet().eval(), 2, 1, 128, 64, 32, radius=2)
    assert err > 1e-3, err  # the same check fails (by orders of magnitude) once statistics span the tile


def test_receptive_radius_bounds_the_measured_one():
    cfg = nets.load_preset("tiny-2d")
    net = trained_like(nets.build(cfg))
    size = 256
    cond = torch.randn(1, 1, size, size, requires_grad=True)
    x = torch.randn(1, 1, size, size, requires_grad=True)
    net(cond, x, torch.tensor([0.3]))[0, 0, size // 2, size // 2].backward()
    reach = np.argwhere((cond.grad.abs() + x.grad.abs())[0, 0].numpy() > 0)
    measured = max(int((reach - size // 2).max()), int((size // 2 - reach).min() * -1))
    assert 0.5 * nets.receptive_radius(cfg) < measured <= nets.receptive_radius(cfg)


@pytest.mark.parametrize("preset,size", [("small-2d", 64), ({**SMALL_3D, "channels": 8, "channel_mult": [1, 2, 2],
                                                              "num_blocks": 2}, 32)])
def test_magnitude_preserved_at_init(preset, size):
    """Unit-variance input keeps unit scale through every block, the way EDM2 builds its layers."""
    cfg = nets.load_preset(preset)
    net = nets.build(cfg).eval()
    scales = []
    for block in net.modules():
        if isinstance(block, nets.Block):
            block.register_forward_hook(lambda m, i, o: scales.append(o.pow(2).mean().sqrt().item()))
    dims = cfg["spatial_dims"]
    with torch.no_grad():
        out = net(torch.randn(2, 1, *[size] * dims), torch.randn(2, 1, *[size] * dims), torch.tensor([0.0, 1.0]))
    assert len(scales) >= 8
    assert all(0.5 < s < 1.6 for s in scales), [round(s, 2) for s in scales]
    assert torch.count_nonzero(out) == 0  # the learned output gain starts at zero (EDM2): training starts from x0 = c_skip·x


def test_presets_with_spatial_statistics_are_refused(tmp_path):
    for extra, msg in [("norm_num_groups: 8", "GroupNorm"), ("norm: batch", "BatchNorm|statistics"),
                       ("attention_levels: [false, true]", "attention")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(nets.resources.files("volrestore").joinpath("presets", "tiny-2d.yaml").read_text()
                       + extra + "\n")
        with pytest.raises(UserError, match=msg):
            nets.load_preset(str(bad))


def test_paper_preset_is_the_papers_network():
    paper = nets.load_preset("paper-2d")
    assert (paper["channels"], paper["channel_mult"], paper["num_blocks"], paper["dropout"]) == (64, [1, 2, 4, 8], 2,
                                                                                                0.2)
    assert (paper["objective"], paper["schedule"]) == ("eps", "cosine")
    assert 60e6 < nets.count_params(nets.build(paper)) < 66e6
