"""Channel groups over random plain chains (tests/strategies.py ``chains``): grouped, depthwise and
transposed convolutions, batch / group / instance / layer norms, squeeze-and-excitation gates, shared
layers, flatten-linear and token heads.  The promise: a random valid removal gives a sub-network equal to the zeroed
super-network and strictly smaller; a stem whose channels form no group says why."""

import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import fxoto
from strategies import chains, supernets, valid_removals
from util import assert_groups_leave


def check_exact(model, x, space, ids):
    space.zero_(ids)
    with torch.no_grad():
        expected = model(x)
        sub = space.construct_subnet(ids)
        got = sub(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5 * max(1.0, float(expected.abs().max())), rtol=0), \
        (got - expected).abs().max()
    if ids:
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    assert_groups_leave(space, ids, sub)


@settings(max_examples=40, deadline=None)
@given(chains(), st.data())
def test_random_chains_random_channel_removals_are_exact(net, data):
    model, x = net
    space = fxoto.build_space(model, (x,), structures="channels")
    note(f"set aside: {[(e.nodes[0], e.reason) for e in space.excluded]}")
    event(f"layers called at several places: {sum(bool(layer.again) for layer in space.layers.values())}")
    assert all(g.kind == "channel" for g in space.groups)
    assert all(e.reason.startswith("channels: ") and len(e.reason) > 20 for e in space.excluded)
    ids = data.draw(valid_removals(space))
    note(f"removed: {[space.slices[i].rows for i in ids]}")
    check_exact(model, x, space, ids)


@settings(max_examples=20, deadline=None)
@given(chains(dtype=torch.float64), st.data())
def test_the_largest_removal_is_exact(net, data):
    """Every stem down to one channel (or one group of channels)."""
    model, x = net
    space = fxoto.build_space(model, (x,), structures="channels")
    ids = space.greedy_max_removal()
    check_exact(model, x, space, ids)


@settings(max_examples=25, deadline=None)
@given(supernets(), st.sampled_from(["channels", "both"]), st.randoms(use_true_random=False))
def test_the_greedy_walk_accepts_what_the_validity_check_accepts(net, structures, rnd):
    """The walk counts channels per stem and checks the dependency graph only where a stem loses
    its last channel (its segment erased): group by group, the same answers as removal_problem."""
    model, x = net
    space = fxoto.build_space(model, (x,), structures=structures)
    order = list(range(len(space.groups)))
    rnd.shuffle(order)
    naive = []
    for i in order:
        if space.is_valid_removal(naive + [i]):
            naive.append(i)
    assert space.greedy_removal(order) == naive
    check_exact(model, x, space, naive)
