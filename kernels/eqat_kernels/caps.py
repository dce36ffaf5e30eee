"""What the Triton kernels run, declared once; imports nothing (no torch, no Triton, no eqat_cli).

The keys are the fields of ``eqat_cli.specs.KernelCaps``; the ``triton`` backend plugin builds
its spec with ``KernelCaps(**CAPS)`` (this package does not import ``eqat_cli``, so the
declaration is plain data). The kernels check bit widths against :data:`SUPPORTED_BITS`.

* bits 2, 3 and 4 (8-bit layers are left to the torch backend);
* compiled kernels run on CUDA tensors (``TRITON_INTERPRET=1`` also runs them on CPU tensors,
  in Triton's interpreter: a test mode, not a device the backend offers);
* every group size: per-channel, any length, a shorter last group;
* no backward: inference only. E2E-QP picks a backend whose kernel has one.
"""

SUPPORTED_BITS = (2, 3, 4)

CAPS = {
    "bits": SUPPORTED_BITS,
    "devices": ("cuda",),
    "group_sizes": None,
    "backward": (),
}
