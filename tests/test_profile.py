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
    ("something_new", "other"),
])
def test_kernel_classes(name, label):
    assert profile.kernel_class(name) == label


def test_tiny_unet_run_prints_both_tables(capsys):
    assert profile.main(["--model", "tiny-unet", "--steps", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "eager us" in out and "patched us" in out and "top 3 kernels" in out


def test_tiny_vae_profile_with_low_memory_runs_the_band_forwards(capsys, monkeypatch):
    from sdkernels import banded
    monkeypatch.setattr(banded, "MIN_BYTES", 1)
    monkeypatch.delenv("SDKERNELS_BAND_MIN_MIB", raising=False)
    calls, real = [], banded.resnet_forward
    monkeypatch.setattr(banded, "resnet_forward", lambda *a: calls.append(1) or real(*a))
    assert profile.main(["--model", "tiny-vae", "--steps", "1", "--top", "3", "--low-memory"]) == 0
    assert calls and "patched with low_memory" in capsys.readouterr().out
