"""The ``cpu`` backend (``quant/cpu_kernel.py``): its C++ kernels equal the reference kernel at every
bit width, group size (ragged ones too) and batch; the torch kernel runs when the library cannot;
its declaration is true; fused q/k/v and gate/up equal the separate layers."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import build, random_packed_layer as make_layer, tiny_llama_config, tiny_qwen2_config
from eqat_cli.quant import cpu_kernel as ck
from eqat_cli.quant.caps import CPU_KERNEL_CAPS
from eqat_cli.quant.linear import REFERENCE_KERNEL, PackedLinear
from eqat_cli.quant.torch_kernel import TORCH_KERNEL
from eqat_cli.registry import get_registry
from eqat_cli.scheme import QuantScheme

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")

# (in, out, group): word-aligned groups, per-channel, a ragged last group (576 = 4.5 x 128,
# 80 = 2.5 x 32), groups that start inside words at 3 bits (any group not a multiple of 10), an
# output count that is not a multiple of the 32-wide tiles, and the common 64/128.
SHAPES = [(96, 40, 32), (128, 64, 64), (256, 70, 128), (96, 40, -1), (576, 48, 128),
          (80, 33, 32), (160, 24, 40), (200, 96, 64)]


def rel_err(y, ref):
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True, scope="module")
def built():
    ok, why = ck.library_status()
    assert ok, why
    yield


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,n,group", SHAPES, ids=str)
def test_matches_reference(bits, k, n, group):
    kernel = ck.cpu_kernel()
    for scales_dtype in (torch.float16, torch.float32):
        layer = make_layer(k, n, bits, group, bias=True, seed=bits + k, scales_dtype=scales_dtype)
        # 1 row and 3 rows: the GEMV; 7 rows: two GEMV passes; 40 rows: dequantized panels.
        for m in (1, 3, 7, 40):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            with torch.no_grad():
                y = kernel.forward(layer, x)
                ref = REFERENCE_KERNEL.forward(layer, x)
            assert y.shape == ref.shape and y.dtype == torch.float32
            assert rel_err(y, ref) <= 1e-5, (bits, k, n, group, m, scales_dtype)


def test_panels_and_leading_dims(monkeypatch):
    """Several output panels (prefill), a 3-D input, and a bf16 input (fp32 arithmetic inside)."""
    monkeypatch.setattr(ck, "PANEL", 32)
    kernel = ck.cpu_kernel()
    layer = make_layer(192, 100, 4, 64, bias=True, seed=3)
    x = torch.randn(2, 30, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = kernel.forward(layer, x)
        ref = REFERENCE_KERNEL.forward(layer, x)
        assert y.shape == (2, 30, 100) and rel_err(y, ref) <= 1e-5
        yb = kernel.forward(layer, x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert rel_err(yb.float(), REFERENCE_KERNEL.forward(layer, x.bfloat16().float())) <= 1e-2
    assert kernel.forward(layer, torch.zeros(0, 192)).shape == (0, 100)
    with pytest.raises(ValueError, match="features"):
        kernel.forward(layer, torch.zeros(1, 100))


def test_follows_zero_points_and_scales_in_place():
    kernel = ck.cpu_kernel()
    layer = make_layer(64, 32, 2, 32, seed=1)
    x = torch.randn(1, 64)
    with torch.no_grad():
        kernel.forward(layer, x)
        layer.scales.mul_(2)
        layer.qzeros.copy_(make_layer(64, 32, 2, 32, seed=2).qzeros)
        torch.testing.assert_close(kernel.forward(layer, x), REFERENCE_KERNEL.forward(layer, x),
                                   rtol=1e-5, atol=1e-6)


def test_fallback_when_the_library_is_unavailable(monkeypatch):
    calls = []

    class Spy:
        name = "spy"

        def forward(self, layer, x):
            calls.append(x.shape)
            return TORCH_KERNEL.forward(layer, x)

    layer = make_layer(96, 40, 3, 32, bias=True, seed=0)
    x = torch.randn(2, 96)
    kernel = ck.CpuKernel(fallback=Spy())
    ck._reset_for_tests()
    monkeypatch.setenv("EQAT_CPU_KERNEL", "0")
    try:
        assert ck.library_status() == (False, "disabled by EQAT_CPU_KERNEL=0")
        with torch.no_grad():
            torch.testing.assert_close(kernel.forward(layer, x), REFERENCE_KERNEL.forward(layer, x),
                                       rtol=1e-4, atol=1e-5)
        assert calls == [x.shape]
        # A failed build (no compiler) is the same: the torch kernel runs.
        ck._reset_for_tests()
        monkeypatch.delenv("EQAT_CPU_KERNEL")
        monkeypatch.setattr(ck, "compiler", lambda: None)
        assert ck.library_status()[0] is False and "no C++ compiler" in ck.library_status()[1]
        with torch.no_grad():
            kernel.forward(layer, x)
        assert len(calls) == 2
    finally:
        ck._reset_for_tests()
    monkeypatch.undo()
    assert ck.library_status()[0] is True  # the cached library loads again, no rebuild needed


def test_build_failure_is_a_reason_not_an_error(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(ck, "SOURCE", bad)
    monkeypatch.setattr(ck, "build_dir", lambda: tmp_path / "build")
    ck._reset_for_tests()
    try:
        ok, why = ck.library_status()
        assert not ok and why.startswith("building the C++ kernel failed")
        assert not list((tmp_path / "build").rglob("*.so"))  # nothing half-written left behind
    finally:
        ck._reset_for_tests()


def test_gradients_go_to_the_torch_kernel():
    """Inference only: a forward that needs gradients runs the fallback (E2E-QP's torch kernel)."""
    layer = make_layer(64, 32, 4, 32, seed=0, scales_dtype=torch.float32)
    layer.start_training()
    x = torch.randn(2, 64)
    ck.cpu_kernel().forward(layer, x).square().sum().backward()
    g = layer.scales.grad.clone()
    layer.scales.grad = None
    REFERENCE_KERNEL.forward(layer, x).square().sum().backward()
    torch.testing.assert_close(g, layer.scales.grad, rtol=1e-4, atol=1e-6)


def test_declaration_is_true():
    """The backend carries the kernel's caps; every declared bit width runs on the CPU; the
    registry picks it for inference on CPUs and never for training (no backward declared)."""
    reg = get_registry()
    spec = reg.backends["cpu"].spec
    assert spec.caps is CPU_KERNEL_CAPS and CPU_KERNEL_CAPS.backward == ()
    assert CPU_KERNEL_CAPS.devices == ("cpu",) and CPU_KERNEL_CAPS.group_sizes is None
    kernel = spec.kernel()
    for bits in CPU_KERNEL_CAPS.bits:
        layer = make_layer(160, 24, bits, 40, seed=bits)
        x = torch.randn(1, 160)
        with torch.no_grad():
            assert rel_err(kernel.forward(layer, x), REFERENCE_KERNEL.forward(layer, x)) <= 1e-5
    assert reg.select_backend("auto", [2, 3, 4, 8], "cpu", [32, -1])[0].name == "cpu"
    assert reg.select_backend("auto", 2, "cuda")[0].name != "cpu"
    assert reg.training_backend(2, "cpu", 64)[0].name == "torch"


@pytest.mark.parametrize("config", [tiny_llama_config, tiny_qwen2_config], ids=["llama", "qwen2"])
def test_fused_groups_equal_separate_layers(config):
    """q/k/v and gate/up as one call per group (qwen2: with q/k/v biases): the model's logits
    equal those of the same packed model with every layer on its own, and the reference's."""
    from eqat_cli.models import attach_backend
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    model = build(config())
    arch = get_registry().architecture_for(model.config.model_type)
    rtn_quantize_model(model, arch, QuantScheme(4, 32))
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attach_backend(model, "reference", 4, "cpu", 32)
        ref = model(ids).logits
        why = attach_backend(model, "cpu", 4, "cpu", 32)  # no arch: each layer alone
        assert "fused" not in why
        alone = model(ids).logits
        why = attach_backend(model, "cpu", 4, "cpu", 32, arch=arch)
        assert f"{2 * model.config.num_hidden_layers} groups" in why
        fused = [n for n, m in model.named_modules()
                 if isinstance(m, PackedLinear) and type(m.kernel).__name__ == "FusedMemberKernel"]
        assert {n.rsplit(".", 1)[1] for n in fused} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
        fused_prefill = model(ids).logits  # 12 rows: more than one GEMV pass, each layer alone
        # Decode: one token at a time through the KV cache runs the fused calls.
        out = model(ids[:, :11], use_cache=True)
        step = model(ids[:, 11:], past_key_values=out.past_key_values, use_cache=True).logits
    assert rel_err(alone, ref) <= 1e-5
    assert rel_err(fused_prefill, ref) <= 1e-5
    assert rel_err(step[:, -1], ref[:, -1]) <= 1e-5
    # Nothing left waiting after a full forward (every member took its output).
    groups = {id(m.kernel.group): m.kernel.group for m in model.modules()
              if isinstance(m, PackedLinear) and hasattr(m.kernel, "group")}
    assert all(g.pending is None for g in groups.values())


def test_fused_member_alone_and_with_other_inputs():
    """A member called with another tensor than its group's pending input computes afresh."""
    from eqat_cli.quant.cpu_kernel import FusedMemberKernel, _Group

    layers = [make_layer(64, n, 2, 32, seed=n) for n in (48, 16, 16)]
    group = _Group(layers)
    kernels = [FusedMemberKernel(ck.cpu_kernel(), group, i) for i in range(3)]
    x1, x2 = torch.randn(1, 64), torch.randn(1, 64)
    with torch.no_grad():
        a = kernels[0].forward(layers[0], x1)
        b = kernels[1].forward(layers[1], x2)  # another input: not the pending output of x1
        c = kernels[2].forward(layers[2], x2)  # pending from x2's call
        for y, l, x in ((a, layers[0], x1), (b, layers[1], x2), (c, layers[2], x2)):
            assert rel_err(y, REFERENCE_KERNEL.forward(l, x)) <= 1e-5
        x3 = torch.randn(1, 64)
        kernels[0].forward(layers[0], x3)
        x3.add_(1)  # changed in place since: the pending output is stale
        assert rel_err(kernels[1].forward(layers[1], x3), REFERENCE_KERNEL.forward(layers[1], x3)) <= 1e-5


# ---------------------------------------------------------------------- --quantize-head


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_head_tied(bits):
    """A tied embedding/lm_head becomes one packed table: lookups are its dequantized rows, the
    head is a PackedLinear on the selected kernel, and the logits stay close to full precision."""
    from eqat_cli.models import attach_backend
    from eqat_cli.quant.linear import PackedEmbedding
    from eqat_cli.quantize import head_scheme, quantize_head

    model = build(tiny_llama_config(tie_word_embeddings=True))
    arch = get_registry().architecture_for("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = model(ids).logits
        done = quantize_head(model, arch, head_scheme(bits))
        assert done == {"bits": bits, "group": 64, "tied": True, "lm_head": True, "embedding": True}
        emb, head = model.model.embed_tokens, model.lm_head
        assert isinstance(emb, PackedEmbedding) and isinstance(head, PackedLinear)
        assert emb.packed is head and head.bits == bits
        torch.testing.assert_close(emb(ids), head.dequantize()[ids], rtol=0, atol=0)
        attach_backend(model, "cpu", bits, "cpu", 64, arch=arch)
        assert head.kernel is ck.cpu_kernel()
        q = model(ids).logits
    assert rel_err(q, fp) < (0.02 if bits == 8 else 0.2)


def test_quantize_head_untied_through_resolve(tmp_path):
    """``models.resolve(head_bits=8)``: untied tables are quantized apart; bad bits are refused."""
    from conftest import save_tiny
    from eqat_cli.errors import BadInputError
    from eqat_cli.models import resolve
    from eqat_cli.quant.linear import PackedEmbedding

    model = build(tiny_llama_config())
    save_tiny(model, tmp_path / "m")
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    lm = resolve(str(tmp_path / "m"), device="cpu", head_bits=8)
    assert lm.quant["head"]["tied"] is False and "cpu" in lm.quant["backend"]
    emb = lm.model.model.embed_tokens
    assert isinstance(emb, PackedEmbedding) and emb.packed is not lm.model.lm_head
    with torch.no_grad():
        assert rel_err(lm.model(ids).logits, model(ids).logits) < 0.02
    with pytest.raises(BadInputError, match="8 or 4 bits"):
        resolve(str(tmp_path / "m"), device="cpu", head_bits=3)
