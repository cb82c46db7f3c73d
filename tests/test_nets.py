"""Tests for imm.nets: the shared call contract, DiT's adaLN-Zero init, sizes, and build errors."""

from __future__ import annotations

import copy

import pytest
import torch

from imm.nets import ARCHS, DiT, build, count_parameters, count_parameters_of
from imm.nets.embeddings import sinusoidal_embedding

NUM_CLASSES = 3

# Tiny versions of each kind of net: (name, sample shape, overrides).
TINY = {
    "mlp": ("mlp", (2,), dict(width=32, depth=2, emb_dim=16)),
    "dit": ("dit_s_2", (4, 8, 8), dict(hidden_size=32, depth=2, num_heads=2)),
    "ddpmpp": (
        "ddpmpp",
        (3, 16, 16),
        dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
    ),
}


def tiny(kind: str, num_classes: int = NUM_CLASSES, **extra) -> torch.nn.Module:
    name, shape, overrides = TINY[kind]
    torch.manual_seed(0)
    return build(name, shape, num_classes=num_classes, **{**overrides, **extra}).eval()


def randomize_zero_init(net: torch.nn.Module, threshold: float = 1e-4) -> torch.nn.Module:
    """Give random values to parameters that start at (or, as in EDM, near) zero.

    Zero-initialised output layers and adaLN gates make a fresh net blind to its inputs, which
    would make "changing X changes the output" tests pass or fail for the wrong reason.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() < threshold:
                fan_in = p[0].numel() if p.ndim > 1 else 10
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return net


def inputs(kind: str, batch: int = 4):
    _, shape, _ = TINY[kind]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, *shape, generator=gen)
    noise_t = 1000 * torch.rand(batch, generator=gen)
    noise_s = noise_t * torch.rand(batch, generator=gen)
    return x, noise_t, noise_s


KINDS = list(TINY)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors (conftest.py)


@pytest.mark.parametrize("kind", KINDS)
def test_output_has_input_shape(kind):
    net = tiny(kind)
    x, t, s = inputs(kind)
    out = net(x, t, s, torch.tensor([0, 1, 2, NUM_CLASSES]))
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert net.num_classes == NUM_CLASSES


@pytest.mark.parametrize("kind", KINDS)
def test_output_dtype_follows_autocast(kind):
    net = tiny(kind)
    x, t, s = inputs(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, s)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kind", KINDS)
def test_time_inputs_change_output(kind):
    net = randomize_zero_init(tiny(kind))
    x, t, s = inputs(kind)
    with torch.no_grad():
        base = net(x, t, s)
        other_s = net(x, t, s * 0.5 + 1.0)
        other_t = net(x, t * 0.5 + 1.0, s)
    # Per sample: every sample must see its own s, not just the batch as a whole.
    per_sample_s = (base - other_s).flatten(1).abs().amax(1)
    assert (per_sample_s > 1e-4).all(), per_sample_s
    assert (base - other_t).abs().max() > 1e-4

    # Changing one sample's s changes that sample only (no mixing across the batch).
    s_one = s.clone()
    s_one[0] += 50.0
    with torch.no_grad():
        out = net(x, t, s_one)
    assert (out[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(out[1:], base[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_labels_change_output_and_null_label_is_its_own(kind):
    net = randomize_zero_init(tiny(kind))
    x, t, s = inputs(kind)
    batch = x.shape[0]
    with torch.no_grad():
        out0 = net(x, t, s, torch.zeros(batch, dtype=torch.long))
        out1 = net(x, t, s, torch.ones(batch, dtype=torch.long))
        null = net(x, t, s, torch.full((batch,), NUM_CLASSES, dtype=torch.long))
    assert (out0 - out1).flatten(1).abs().amax(1).min() > 1e-4
    assert (out0 - null).flatten(1).abs().amax(1).min() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_missing_labels_mean_null_label(kind):
    net = randomize_zero_init(tiny(kind))
    x, t, s = inputs(kind)
    null = torch.full((x.shape[0],), NUM_CLASSES, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, s), net(x, t, s, null), rtol=0, atol=0)
        assert (net(x, t, s) - net(x, t, s, torch.zeros_like(null))).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_unconditional_net_rejects_labels(kind):
    net = tiny(kind, num_classes=0)
    x, t, s = inputs(kind)
    assert net.num_classes == 0
    assert net(x, t, s).shape == x.shape
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, s, torch.zeros(x.shape[0], dtype=torch.long))


@pytest.mark.parametrize("kind", KINDS)
def test_augment_labels_change_output_and_none_is_zeros(kind):
    net = randomize_zero_init(tiny(kind, augment_dim=9))
    x, t, s = inputs(kind)
    labels = torch.randn(x.shape[0], 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        none, zeros = net(x, t, s), net(x, t, s, augment_labels=torch.zeros_like(labels))
        augmented = net(x, t, s, augment_labels=labels)
    torch.testing.assert_close(none, zeros, rtol=0, atol=0)  # sampling (None) is the un-augmented image
    assert (augmented - none).flatten(1).abs().amax(1).min() > 1e-4
    plain = tiny(kind)  # without augmentation the net has no such weights
    assert count_parameters(net) - count_parameters(plain) == 9 * net_width(net)


def net_width(net) -> int:
    """The width of the conditioning vector the augmentation labels are mapped into."""
    layer = getattr(net, "map_augment", None) or net.augment_embedder
    return layer.out_features


@pytest.mark.parametrize("kind", KINDS)
def test_augment_labels_must_fit_the_net(kind):
    x, t, s = inputs(kind)
    with pytest.raises(ValueError, match="augment_dim=0"):
        tiny(kind)(x, t, s, augment_labels=torch.zeros(x.shape[0], 9))
    with pytest.raises(ValueError, match=r"augment_labels must have shape \[4, 9\]"):
        tiny(kind, augment_dim=9)(x, t, s, augment_labels=torch.zeros(x.shape[0], 8))


@pytest.mark.parametrize("kind", KINDS)
def test_time_inputs_must_be_one_per_sample(kind):
    net = tiny(kind)
    x, t, s = inputs(kind)
    with pytest.raises(ValueError, match="noise_s"):
        net(x, t, s[:1])


def test_dit_blocks_start_as_identity():
    net = tiny("dit")
    # Make the output depend on the tokens, so an active block would show up in it.
    randomize_zero_init(net.final_layer)
    x, t, s = inputs("dit")
    with torch.no_grad():
        before = net(x, t, s)
        assert before.abs().max() > 1e-3
        perturbed = copy.deepcopy(net)
        for block in perturbed.blocks:
            for module in (block.attn, block.mlp):
                for p in module.parameters():
                    p.add_(torch.randn_like(p))
        torch.testing.assert_close(perturbed(x, t, s), before)

        # Control: once the gates are non-zero, the same perturbation must show.
        randomize_zero_init(perturbed.blocks[0])
        gated = copy.deepcopy(perturbed)
        for p in gated.blocks[0].attn.parameters():
            p.add_(torch.randn_like(p))
        assert (gated(x, t, s) - perturbed(x, t, s)).abs().max() > 1e-3


def test_dit_final_layer_and_modulations_are_zero_at_init():
    net = tiny("dit")
    final = net.final_layer
    for p in [*final.linear.parameters(), *final.adaLN_modulation.parameters()]:
        if p.ndim == 0 or p.numel() == 0:
            continue
        assert torch.count_nonzero(p) == 0
    for block in net.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[-1].bias) == 0
    x, t, s = inputs("dit")
    assert torch.count_nonzero(net(x, t, s)) == 0


def test_dit_position_embedding_is_a_fixed_buffer():
    net = tiny("dit")
    names = {name for name, _ in net.named_parameters()}
    assert not any("pos_embed" in name for name in names)
    grid = 8 // 2
    assert net.pos_embed.shape == (1, grid * grid, 32)
    # Distinct patches get distinct codes.
    assert torch.cdist(net.pos_embed[0], net.pos_embed[0]).fill_diagonal_(1).min() > 1e-3


def test_ddpmpp_output_starts_near_zero():
    # EDM scales the final conv by 1e-5, so a fresh U-Net predicts almost nothing.
    net = tiny("ddpmpp")
    x, t, s = inputs("ddpmpp")
    with torch.no_grad():
        assert net(x, t, s).abs().max() < 1e-2


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("dit_s_2", (4, 32, 32), 33e6),
        ("dit_b_2", (4, 32, 32), 130e6),
        ("dit_l_2", (4, 32, 32), 458e6),
        ("dit_xl_2", (4, 32, 32), 675e6),
        ("ddpmpp", (3, 32, 32), 55.7e6),
    ],
)
def test_full_size_parameter_counts(name, shape, expected):
    count = count_parameters_of(name, shape)
    assert abs(count - expected) / expected < 0.05, f"{name}: {count / 1e6:.2f}M"


def test_count_parameters_counts_trainable_only():
    net = tiny("mlp")
    total = count_parameters(net)
    assert total == sum(p.numel() for p in net.parameters())
    net.inp.weight.requires_grad_(False)
    assert count_parameters(net) == total - net.inp.weight.numel()


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_net_fits_a_fixed_batch(kind):
    net = tiny(kind).train()
    x, t, s = inputs(kind, batch=8)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = (net(x, t, s, labels) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_sinusoidal_embedding_frequencies():
    x = torch.tensor([0.0, 1.0])
    emb = sinusoidal_embedding(x, 8, max_period=10000.0, endpoint=True)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    # endpoint=True reaches exactly 1/max_period as the lowest frequency.
    torch.testing.assert_close(emb[1, 3], torch.cos(torch.tensor(1e-4)))
    # Nearby times 1000*t must stay distinguishable (spec §1.3: "a large c").
    close = sinusoidal_embedding(torch.tensor([990.0, 990.5]), 256)
    assert (close[0] - close[1]).abs().max() > 0.1


def test_archs_all_build_at_tiny_size():
    for name in ARCHS:
        shape = (2,) if name == "mlp" else (3, 16, 16)
        overrides = {}
        if name.startswith("dit"):
            overrides = dict(hidden_size=32, depth=1, num_heads=2)
        elif name == "ddpmpp":
            overrides = TINY["ddpmpp"][2]
        net = build(name, shape, **overrides)
        assert net.num_classes == 0


@pytest.mark.parametrize(
    "name, shape, overrides, message",
    [
        ("mlp", (3, 32, 32), {}, "point data"),
        ("dit_s_2", (2,), {}, "images"),
        ("ddpmpp", (2,), {}, "images"),
        ("dit_s_4", (3, 30, 30), {}, "divisible by 4"),
        ("dit_s_2", (3, 16, 12), {}, "square"),
        ("ddpmpp", (3, 30, 30), {}, "divisible by 4"),
        ("resnet", (3, 32, 32), {}, "Unknown architecture"),
        ("dit_s_2", (4, 32, 32), dict(widht=3), "no setting"),
        ("dit_s_2", (4, 32, 32), dict(input_size=64), "no setting"),
    ],
)
def test_build_rejects_mismatched_data(name, shape, overrides, message):
    with pytest.raises(ValueError, match=message):
        with torch.device("meta"):
            build(name, shape, **overrides)


def test_build_overrides_replace_preset_fields():
    with torch.device("meta"):
        net = build("dit_b_4", (4, 32, 32), num_classes=10, hidden_size=64, depth=3, num_heads=4)
    assert isinstance(net, DiT)
    assert len(net.blocks) == 3
    assert net.patch_size == 4
    assert net.y_embedder.table.num_embeddings == 11
