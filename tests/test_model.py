"""MAPConNet: shapes, vertex-order equivariance, different vertex counts, backends agree."""
import pytest
import torch

from mapconnet.model import CANCELLED_BIAS, MAPConNet, ModelConfig, instance_norm, nearest_vertices

TINY = dict(feature_dim=16, encoder_widths=(8, 16), residual_blocks=1, decoder_widths=(16, 8))


def _trained_looking(model):
    """A model whose residual decoder no longer outputs zero (its last layer starts at zero), so
    tests of the decoder's values and gradients see it."""
    torch.nn.init.normal_(model.decoder.out.weight, std=0.1)
    if model.decoder.neighbours:  # the local context's projection starts at zero too
        torch.nn.init.normal_(model.decoder.local_out.weight, std=0.1)
    return model


def test_shapes_with_different_vertex_counts():
    model = MAPConNet(ModelConfig(**TINY, backend="chunked")).eval()
    identity, pose = torch.randn(2, 50, 3), torch.randn(2, 37, 3)
    out = model(identity, pose)
    assert out.output.shape == out.warped.shape == (2, 50, 3)
    assert out.identity_features.shape == (2, 50, 16) and out.pose_features.shape == (2, 37, 16)
    assert out.warped_features.shape == (2, 50, 16)
    assert out.matching.shape == (2, 50) and out.matching.dtype == torch.int64
    assert int(out.matching.max()) < 37
    published = MAPConNet(ModelConfig(**TINY, backend="chunked", decoder_output="absolute")).eval()
    assert published(identity, pose).output.abs().max() <= 2  # Y = 2 tanh(.)


def test_untrained_residual_model_returns_the_warped_mesh():
    """Y = W + D(.) with D's last layer at zero: the untrained model is the correspondence alone,
    exactly, and its decoder still receives gradients through that last layer."""
    model = MAPConNet(ModelConfig(**TINY, backend="chunked"))
    identity, pose = torch.randn(2, 40, 3), torch.randn(2, 31, 3)
    out = model(identity, pose)
    assert torch.equal(out.output, out.warped)
    out.output.square().sum().backward()
    assert model.decoder.out.weight.grad.abs().sum() > 0
    assert model.theta.weight.grad.abs().sum() > 0  # the correspondence learns through W


def test_decoder_reads_the_identity_coordinates():
    """With decoder_sees_identity the decoder's input is [W, identity xyz]: its output moves when the
    identity coordinates it is given move, with W and the code held fixed."""
    torch.manual_seed(0)
    decoder = _trained_looking(MAPConNet(ModelConfig(**TINY))).decoder.eval()
    assert decoder.lift.in_features == 6
    warped, code, identity = torch.randn(1, 30, 3), torch.randn(1, 30, 8), torch.randn(1, 30, 3)
    with torch.no_grad():
        assert not torch.allclose(decoder(warped, code, identity), decoder(warped, code, identity + 0.1))
    alone = MAPConNet(ModelConfig(**TINY, decoder_sees_identity=False)).decoder
    assert alone.lift.in_features == 3


def test_full_size_model_parameter_shapes():
    model = MAPConNet()
    assert model.encoder.fc3.out_features == 256 and len(model.encoder.blocks) == 4
    assert [b.fc_s.in_features for b in model.decoder.blocks] == [256, 128, 64]
    assert model.decoder.lift.in_features == 6 and model.decoder.lift.out_features == 256
    published = MAPConNet(ModelConfig(decoder_widths=(1024, 512, 256), decoder_output="absolute",
                                      decoder_sees_identity=False))
    assert [b.fc_s.in_features for b in published.decoder.blocks] == [1024, 512, 256]
    assert published.decoder.lift.in_features == 3


@pytest.mark.parametrize("context", [{"decoder_neighbours": 0}, {"encoder_neighbours": 5, "encoder_global": True}, {}],
                         ids=["per-vertex", "encoder-neighbours-and-global", "decoder-neighbours"])
def test_equivariant_to_vertex_order(context):
    torch.manual_seed(0)
    model = _trained_looking(MAPConNet(ModelConfig(**TINY, **context, backend="torch"))).eval()
    identity, pose = torch.randn(1, 40, 3, dtype=torch.float64), torch.randn(1, 33, 3, dtype=torch.float64)
    model = model.double()
    perm_i, perm_p = torch.randperm(40), torch.randperm(33)
    with torch.no_grad():
        a = model(identity, pose)
        b = model(identity[:, perm_i], pose[:, perm_p])
    torch.testing.assert_close(b.output, a.output[:, perm_i])  # permuting I permutes Y the same way
    torch.testing.assert_close(b.warped, a.warped[:, perm_i])  # the pose mesh's order does not matter
    assert torch.equal(perm_p[b.matching], a.matching[:, perm_i])


@pytest.mark.parametrize("backend", ["chunked", "keops", "triton"])
def test_backends_agree_with_dense(backend):
    """The model gives the same function through every kernels backend. In float64: the decoder's
    instance norms amplify the backends' different float32 summation orders in W (within 1e-6)
    by an amount that depends on the CPU's kernels, which would test the CPU, not the plumbing."""
    torch.manual_seed(0)
    model = _trained_looking(MAPConNet(ModelConfig(**TINY, backend="torch"))).double().eval()
    identity, pose = torch.randn(2, 30, 3, dtype=torch.float64), torch.randn(2, 26, 3, dtype=torch.float64)
    with torch.no_grad():
        dense = model(identity, pose)
        model.cfg.backend = backend
        other = model(identity, pose)
    assert not torch.equal(dense.output, dense.warped)
    torch.testing.assert_close(other.warped, dense.warped, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(other.output, dense.output, rtol=1e-9, atol=1e-10)


def test_nearest_vertices_match_brute_force_across_row_blocks():
    torch.manual_seed(0)
    x = torch.randn(2, 45, 3, dtype=torch.float64)
    idx = nearest_vertices(x, 6, rows=8)  # 6 row blocks, the last one partial
    expected = torch.cdist(x, x).argsort(dim=-1)[..., :6]
    assert idx.shape == (2, 45, 6)
    assert torch.equal(idx, expected) and torch.equal(idx[..., 0], torch.arange(45).expand(2, -1))
    assert nearest_vertices(x[:, :4], 6).shape == (2, 4, 4)  # k larger than the mesh: every vertex


def test_encoder_context_reads_the_neighbourhood_and_the_whole_body():
    """With encoder_neighbours a vertex's features depend on where its neighbours are (a far vertex
    moving changes nothing else than through the norms); encoder_global's whole-body context starts
    silent and then counts: it meets the per-vertex features before a nonlinearity, so the feature
    layer's instance norm cannot cancel it (as it did a context concatenated after the LeakyReLU)."""
    torch.manual_seed(0)
    x = torch.randn(1, 60, 3)
    local = MAPConNet(ModelConfig(**TINY, encoder_neighbours=4)).encoder.eval()
    assert local.fc3.in_features == 16
    moved = x.clone()
    moved[0, nearest_vertices(x, 4)[0, 0, 1]] += 0.05  # the nearest neighbour of vertex 0
    with torch.no_grad():
        assert not torch.allclose(local(moved)[0, 0], local(x)[0, 0])
    plain = MAPConNet(ModelConfig(**TINY)).encoder
    whole = MAPConNet(ModelConfig(**TINY, encoder_global=True)).encoder
    assert whole.fc3.in_features == 16 and whole.fc_global.weight.shape == (16, 16)
    assert torch.all(whole.fc_global.weight == 0)
    missing, unexpected = whole.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["fc_global.weight"] and not unexpected
    with torch.no_grad():  # silent at the start: the same function as without it
        torch.testing.assert_close(whole(x), plain(x), rtol=0, atol=0)
    whole(x).square().mean().backward()  # not rounding noise: of the order of the second layer's gradient
    assert whole.fc_global.weight.grad.norm() > 1e-2 * whole.fc2.weight.grad.norm()
    with torch.no_grad():
        torch.nn.init.normal_(whole.fc_global.weight, std=0.3)
        assert (whole(x) - plain(x)).norm() > 1e-2 * plain(x).norm()
    with pytest.raises(ValueError, match="--encoder-neighbours must be >= 0, got -1"):
        ModelConfig(encoder_neighbours=-1)


def test_instance_norm_statistics():
    x = torch.randn(3, 100, 5) * 4 + 2
    y = instance_norm(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(3, 5), atol=1e-3, rtol=0)


def test_initialisation():
    model = MAPConNet(ModelConfig(**TINY))
    linears = dict((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert all(torch.all(m.bias == 0) for m in linears.values() if m.bias is not None)
    # exactly the layers an instance norm follows have no bias (it would cancel)
    assert {n for n, m in linears.items() if m.bias is None} == {
        n for n in linears if CANCELLED_BIAS.fullmatch(f"{n}.bias")} != set()
    w = model.decoder.lift.weight
    assert 0 < w.std() < 0.02  # Xavier-normal, gain 0.02
    assert torch.all(model.decoder.out.weight == 0)  # residual: the untrained decoder adds nothing
    published = MAPConNet(ModelConfig(**TINY, decoder_output="absolute"))
    assert 0 < published.decoder.out.weight.std() < 0.02


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="feature_dim must be even"):
        ModelConfig(feature_dim=15)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ModelConfig(backend="cuda")
    with pytest.raises(ValueError, match=r"decoder_output must be one of \('residual', 'absolute'\), got 'tanh'"):
        ModelConfig(decoder_output="tanh")
    model = MAPConNet(ModelConfig(**TINY))
    with pytest.raises(ValueError, match=r"must be \(B, N, 3\) meshes"):
        model(torch.randn(2, 10, 2), torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(torch.randn(2, 10, 3), torch.randn(1, 10, 3))


def test_decoder_checkpointing_gives_the_same_gradients():
    """Recomputing decoder stages in the backward changes memory, not values (eval mode freezes the
    spectral norms' power iteration, which a recompute would otherwise advance once more)."""
    torch.manual_seed(0)
    identity, pose = torch.randn(1, 30, 3), torch.randn(1, 25, 3)
    grads = []
    for flag in (False, True):
        torch.manual_seed(1)
        model = _trained_looking(MAPConNet(ModelConfig(**TINY, backend="chunked", checkpoint_decoder=flag))).eval()
        model(identity, pose).output.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)



def test_decoder_local_context_starts_silent():
    """decoder_neighbours adds a branch whose projection starts at zero: the grown decoder computes
    the same function as one without it, and the branch learns (its projection gets a gradient)."""
    torch.manual_seed(0)
    plain = _trained_looking(MAPConNet(ModelConfig(**TINY, decoder_neighbours=0))).decoder.eval()
    grown = MAPConNet(ModelConfig(**TINY, decoder_neighbours=4)).decoder.eval()
    assert grown.local_out.weight.abs().sum() == 0
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["local.weight", "local_out.bias", "local_out.weight"] and not unexpected
    warped, code, identity = torch.randn(1, 40, 3), torch.randn(1, 40, 8), torch.randn(1, 40, 3)
    torch.testing.assert_close(grown(warped, code, identity), plain(warped, code, identity), rtol=0, atol=0)
    grown(warped, code, identity).square().sum().backward()
    assert grown.local_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="--decoder-neighbours must be >= 0, got -2"):
        ModelConfig(decoder_neighbours=-2)


def test_decoder_hops_start_silent():
    """decoder_hops adds message passing after the first stages, through projections that start at
    zero: the grown decoder computes the same function and the projections learn (they get a
    gradient). Bad values are refused."""
    torch.manual_seed(0)
    plain = _trained_looking(MAPConNet(ModelConfig(**TINY, decoder_neighbours=2))).decoder.eval()
    grown = MAPConNet(ModelConfig(**TINY, decoder_neighbours=2, decoder_hops=2)).decoder.eval()
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert {m.split(".")[0] for m in missing} == {"hop_in", "hop_out"} and not unexpected
    assert all(out.weight.abs().sum() == 0 for out in grown.hop_out)
    warped, code, identity = torch.randn(1, 40, 3), torch.randn(1, 40, 8), torch.randn(1, 40, 3)
    torch.testing.assert_close(grown(warped, code, identity), plain(warped, code, identity), rtol=0, atol=0)
    grown(warped, code, identity).square().sum().backward()
    assert all(out.weight.grad.abs().sum() > 0 for out in grown.hop_out)
    with pytest.raises(ValueError, match=r"--decoder-hops must be at most the number of decoder stages \(3\), got 4"):
        ModelConfig(decoder_hops=4)
    with pytest.raises(ValueError, match="--decoder-hops needs the decoder's neighbours"):
        ModelConfig(decoder_neighbours=0, decoder_hops=1)
    with pytest.raises(ValueError, match="--decoder-hops must be >= 0, got -1"):
        ModelConfig(decoder_hops=-1)
