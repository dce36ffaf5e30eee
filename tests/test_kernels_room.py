"""The kernel room: each kernel declares what it runs once (``KernelCaps``), the backends carry
those declarations, the registry picks kernels for inference and for E2E-QP's training from them,
and the declarations are true. ``eqat_kernels`` imports nothing of ``eqat_cli``."""

from __future__ import annotations

import ast
import shutil

import pytest
import torch

from conftest import REPO
from conftest import random_packed_layer as make_layer
from eqat_cli.errors import UnsupportedError
from eqat_cli.hookspecs import hookimpl
from eqat_cli.plugin_manager import build_plugin_manager, get_plugin_manager
from eqat_cli.quant.caps import REFERENCE_KERNEL_CAPS, TORCH_KERNEL_CAPS
from eqat_cli.quant.linear import REFERENCE_KERNEL
from eqat_cli.registry import Registry, get_registry, reset_registry
from eqat_cli.specs import TRAINABLE, BackendSpec, KernelCaps

# What ``auto`` picks on a CPU: the C++ kernel's backend wherever a compiler can build it.
CPU_AUTO = "cpu" if shutil.which("g++") else "torch"

# (in, out, group): word-aligned groups, a ragged last group, per-channel, and 3-bit groups that
# do not start on word boundaries.
SHAPES = [(96, 40, 32), (200, 24, 64), (96, 40, -1), (160, 24, 40)]


# ---------------------------------------------------------------------- declarations


def test_builtin_backends_carry_their_kernels_declarations():
    from eqat_kernels.caps import CAPS

    from eqat_cli.quant.primitives import SUPPORTED_BITS

    reg = get_registry()
    assert reg.backends["torch"].spec.caps is TORCH_KERNEL_CAPS
    assert reg.backends["reference"].spec.caps is REFERENCE_KERNEL_CAPS
    assert reg.backends["triton"].spec.caps == KernelCaps(**CAPS)
    # The torch kernels run every bit width the packed format has.
    assert TORCH_KERNEL_CAPS.bits == REFERENCE_KERNEL_CAPS.bits == SUPPORTED_BITS
    for reg_ in reg.backends.values():  # bits and devices are read from the caps, not repeated
        assert (reg_.spec.bits, reg_.spec.devices) == (reg_.spec.caps.bits, reg_.spec.caps.devices)


def test_kernel_caps_validate_and_explain():
    with pytest.raises(ValueError, match="trainable tensors are scales, zeros"):
        KernelCaps(bits=(4,), devices=("cpu",), backward=("qweight",))
    with pytest.raises(TypeError, match="must be a tuple"):
        KernelCaps(bits=[4], devices=("cpu",))
    with pytest.raises(ValueError, match="no bits or no devices"):
        KernelCaps(bits=(), devices=("cpu",))
    with pytest.raises(TypeError, match="caps must be a KernelCaps"):
        BackendSpec(name="x", priority=0, caps={"bits": (4,)}, available=lambda: (True, ""),
                    kernel=lambda: None)
    caps = KernelCaps(bits=(2, 4), devices=("cuda",), group_sizes=(64, 128), backward=("scales",))
    assert caps.rejects(4, "cpu") == "runs on cuda, not cpu"
    assert caps.rejects([2, 3], "cuda") == "supports bits 2, 4, not 3"
    assert caps.rejects(2, "cuda", [128, 32]) == "supports group sizes 64, 128, not 32"
    assert caps.rejects(2, "cuda", None) is None  # group sizes not asked
    assert caps.rejects(2, "cuda", 64, ("scales",)) is None
    assert caps.rejects(2, "cuda", 64, TRAINABLE) == (
        "its backward gives gradients for scales, not zeros"
    )
    inference = KernelCaps(bits=(2,), devices=("cuda",))
    assert inference.group_sizes is None and inference.rejects(2, "cuda", 7) is None
    assert inference.rejects(2, "cuda", trains=("scales",)) == "has no backward (inference only)"


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("k,n,group", SHAPES, ids=str)
def test_declarations_are_true(backend, k, n, group):
    """Every bit width a CPU backend declares runs and matches the reference; it differentiates
    exactly the tensors its ``backward`` names (and those gradients equal the reference's)."""
    spec = get_registry().backends[backend].spec
    kernel = spec.kernel()
    for bits in spec.caps.bits:
        layer = make_layer(k, n, bits, group, bias=True, seed=bits, scales_dtype=torch.float32)
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(bits))
        with torch.no_grad():
            torch.testing.assert_close(kernel.forward(layer, x), REFERENCE_KERNEL.forward(layer, x),
                                       rtol=1e-4, atol=1e-5)
        layer.start_training(train_zeros=True)
        grads = {}
        for name, kern in (("ref", REFERENCE_KERNEL), ("kernel", kernel)):
            layer.scales.grad = layer.zeros_fp.grad = None
            kern.forward(layer, x).square().sum().backward()
            grads[name] = {"scales": layer.scales.grad, "zeros": layer.zeros_fp.grad}
        for t in TRAINABLE:
            if t in spec.caps.backward:
                assert grads["kernel"][t] is not None, (bits, t)
                ref = grads["ref"][t]  # fp32 sums in another order: test_torch_kernel's bound
                torch.testing.assert_close(grads["kernel"][t], ref, rtol=1e-4,
                                           atol=1e-4 * ref.abs().max().item())
            else:  # not declared: no gradient reaches it
                assert grads["kernel"][t] is None, (bits, t)


# ---------------------------------------------------------------------- registry lookups


def test_training_backend_is_picked_from_the_declarations():
    reg = get_registry()
    spec, why = reg.training_backend(2, "cpu", 32)
    assert spec.name == "torch" and "differentiates scales" in why
    # On a GPU the Triton kernels would win inference but have no backward: E2E-QP gets torch
    # there too (the caps decide before any hardware check).
    spec, why = reg.training_backend([2, 4], "cuda", [32, 128])
    assert spec.name == "torch"
    assert "triton rejected: has no backward (inference only)" in why
    # Float zero points (--train-zeros) need the reference kernel's autograd.
    spec, why = reg.training_backend(2, "cpu", 32, ("scales", "zeros"))
    assert spec.name == "reference"
    assert "torch rejected: its backward gives gradients for scales, not zeros" in why


def test_no_training_backend_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("EQAT_BLOCK_PLUGINS", "backend_torch,backend_reference")
    reg = Registry(build_plugin_manager())
    assert set(reg.backends) == {"triton", "cpu"}
    with pytest.raises(UnsupportedError) as e:
        reg.training_backend(2, "cpu", 64)
    assert str(e.value) == (
        "no backend can train the scales of 2-bit layers on cpu: triton rejected: runs on cuda, "
        "not cpu; cpu rejected: has no backward (inference only)"
    )
    assert "KernelCaps" in e.value.hint


def test_group_sizes_are_part_of_the_choice(registered):
    class Grouped:
        @hookimpl
        def register_backends(self, register):
            register(BackendSpec(
                name="g128", priority=50,
                caps=KernelCaps(bits=(4,), devices=("cpu",), group_sizes=(128,), backward=("scales",)),
                available=lambda: (True, "here"), kernel=lambda: "g128-kernel",
            ))

    reg = registered(Grouped(), "grouped")
    assert reg.select_backend("auto", 4, "cpu", 128)[0].name == "g128"
    assert reg.training_backend(4, "cpu", [128])[0].name == "g128"
    spec, why = reg.select_backend("auto", 4, "cpu", [128, 64])
    assert spec.name == CPU_AUTO and "g128 rejected: supports group sizes 128, not 64" in why
    with pytest.raises(UnsupportedError, match="cannot run 2/4-bit layers on cpu: supports bits 4, not 2"):
        reg.select_backend("g128", [2, 4], "cpu")


def test_e2e_qp_trains_with_the_registry_choice(monkeypatch):
    from torch import nn

    from eqat_cli.quant.torch_kernel import TORCH_KERNEL
    from eqat_cli.train import e2e_qp

    def student():
        model = nn.Sequential(make_layer(96, 40, 2, 32), make_layer(40, 24, 4, -1))
        model.config = type("Config", (), {"use_cache": True})()
        return model

    m = student()
    e2e_qp.prepare_student(m, train_zeros=False, checkpointing=False)
    assert all(layer.kernel is TORCH_KERNEL for layer in m)
    m = student()
    e2e_qp.prepare_student(m, train_zeros=True, checkpointing=False, device="cpu")
    assert all(layer.kernel is REFERENCE_KERNEL for layer in m)

    monkeypatch.setenv("EQAT_BLOCK_PLUGINS", "backend_torch,backend_reference")
    get_plugin_manager.cache_clear()
    reset_registry()
    try:
        with pytest.raises(UnsupportedError, match="no backend can train the scales of 2/4-bit layers on cpu"):
            e2e_qp.prepare_student(student(), train_zeros=False, checkpointing=False)
    finally:
        monkeypatch.delenv("EQAT_BLOCK_PLUGINS")
        reset_registry(reload_plugins=True)


# ---------------------------------------------------------------------- eqat_kernels


def test_eqat_kernels_imports_nothing_of_eqat_cli():
    """Checked on the source (the Triton modules cannot be imported without Triton)."""
    package = REPO / "kernels" / "eqat_kernels"
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "eqat_cli"]
    assert not offenders, offenders


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,n,group", SHAPES, ids=str)
def test_eqat_kernels_reference_is_eqats_definition(bits, k, n, group):
    """The Triton kernels' own torch reference unpacks and dequantizes bit for bit like
    ``PackedLinear`` (it no longer borrows eqat_cli's code, so this ties the two)."""
    from eqat_kernels import reference

    layer = make_layer(k, n, bits, group, seed=bits)
    assert torch.equal(reference.unpack_codes(layer.qweight, bits, k), layer.codes())
    assert torch.equal(reference.unpack_zeros(layer.qzeros, bits, n), layer.zero_points())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = reference.dequantize(layer.qweight, layer.qzeros, layer.scales, bits, group, k, dtype)
        assert torch.equal(got, layer.dequantize(dtype)), dtype
