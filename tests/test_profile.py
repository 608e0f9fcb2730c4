"""python -m sdkernels.profile: kernel names land in the right classes, and a run prints both tables."""
import pytest

from sdkernels import profile


@pytest.mark.parametrize("name, label", [
    ("_flash_attention_fwd", "attention"),
    ("pytorch_flash::flash_fwd_kernel<...>", "attention"),
    ("_one_pass_kernel", "groupnorm"),
    ("void (anonymous namespace)::group_norm_nhwc_kernel<__half>", "groupnorm"),
    ("_linear_geglu_kernel", "geglu/gelu"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN", "gemm"),
    ("aten::addmm", "gemm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>", "elementwise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half>", "layernorm"),
    ("_tile_kernel", "groupnorm"),
    ("_bias_residual_kernel", "elementwise"),
    ("triton_red_fused_native_group_norm_silu_3", "groupnorm"),
    ("something_new", "other"),
])
def test_kernel_classes(name, label):
    assert profile.kernel_class(name) == label


def test_tiny_unet_run_prints_both_tables(capsys):
    assert profile.main(["--model", "tiny-unet", "--steps", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "eager us" in out and "patched us" in out and "top 3 kernels" in out


def test_the_compile_column_sums_each_class_and_its_total():
    eager = {"nvjet_hsh_gemm": 10.0, "_one_pass_kernel": 5.0}
    patched = {"nvjet_hsh_gemm": 8.0}
    compiled = {"nvjet_hsh_gemm": 9.0, "triton_red_fused_native_group_norm_silu_0": 3.0}
    lines = profile.report(eager, patched, 1, compiled).splitlines()
    assert "compile us" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:4]}
    assert rows["gemm"] == ["10.0", "66.7%", "8.0", "100.0%", "9.0", "75.0%"]
    assert rows["groupnorm"] == ["5.0", "33.3%", "0.0", "0.0%", "3.0", "25.0%"]
    assert rows["total"] == ["15.0", "8.0", "12.0"]


def test_tiny_vae_profile_with_low_memory_runs_the_band_forwards(capsys, monkeypatch):
    from sdkernels import banded
    monkeypatch.setattr(banded, "MIN_BYTES", 1)
    monkeypatch.delenv("SDKERNELS_BAND_MIN_MIB", raising=False)
    calls, real = [], banded.resnet_forward
    monkeypatch.setattr(banded, "resnet_forward", lambda *a: calls.append(1) or real(*a))
    assert profile.main(["--model", "tiny-vae", "--steps", "1", "--top", "3", "--low-memory"]) == 0
    assert calls and "patched with low_memory" in capsys.readouterr().out
