"""pytest plugin: stand in for torch's CPU `_scaled_mm` with CUDA's rules, for torch releases whose CPU kernel takes
per-tensor scales only (2.11, the GPU machine's). With it, the fp8 tests run the device's torch (dynamo, AOT autograd,
inductor) on the CPU: the operands must have the layouts cuBLAS needs (a row-major, b column-major), the scales may
be per row of a and per column of b. Used by `bench/check_device_torch.sh`."""
import torch

_lib = torch.library.Library("aten", "IMPL")


def _scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
    assert a.dtype == torch.float8_e4m3fn and b.dtype == torch.float8_e4m3fn, (a.dtype, b.dtype)
    assert a.stride(1) == 1, f"_scaled_mm: mat1 must be row-major, strides {a.stride()}"
    assert b.stride(0) == 1, f"_scaled_mm: mat2 must be column-major, strides {b.stride()}"
    assert scale_a.numel() == 1 or scale_a.shape == (a.shape[0], 1), f"scale_a {tuple(scale_a.shape)}"
    assert scale_b.numel() == 1 or scale_b.shape == (1, b.shape[1]), f"scale_b {tuple(scale_b.shape)}"
    out = (a.float() * scale_a.float()) @ (b.float() * scale_b.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or torch.float32)


def _scaled_mm_out(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False, *,
                   out):
    return out.copy_(_scaled_mm(a, b, scale_a, scale_b, bias, scale_result, out_dtype, use_fast_accum))


_lib.impl("_scaled_mm", _scaled_mm, "CPU")
_lib.impl("_scaled_mm.out", _scaled_mm_out, "CPU")  # what inductor's compiled code calls
