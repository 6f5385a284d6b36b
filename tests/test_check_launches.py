"""`python -m vtattn.check_launches`: the launch plans of csrc/include/launch_plan.h checked against
each architecture's limits, on CPU. The ptxas figures below are a report CUDA 13.0 printed for
select_tokens.cu (scripts/nvcc_record.sh writes such reports at build time)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vtattn import check_launches as cl

ROOT = Path(__file__).resolve().parents[1]
SELECT = ("_ZN6vtattn54_GLOBAL__N__692f5699_16_select_tokens_cu_9fff6666_919013select_kernelIfEEvPKT_llPKlllNS0_8"
          "SegmentsEiibPlPbS8_")
PTXAS = "\n".join(f"""ptxas info    : Compiling entry function '{SELECT}' for '{arch}'
ptxas info    : Function properties for {SELECT}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used {regs} registers, used 1 barriers, 3376 bytes smem, 1472 bytes cmem[0], 8 bytes cmem[2]
ptxas info    : Compile time = 81.916 ms""" for arch, regs in (("sm_80", 34), ("sm_90a", 48)))
SELECT_SHAPES = [("select_tokens", (1, 1, L)) for L in range(0, 16385)]

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a host C++ compiler")


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    d = tmp_path_factory.mktemp("ptxas")
    (d / "select_tokens.txt").write_text(PTXAS)
    return cl.read_ptxas(d)


def _source_with(tmp_path, old, new):
    """A copy of the plan sources with `old` replaced by `new` in launch_plan.h (which must hold it)."""
    for rel in ("csrc/include/launch_plan.h", "csrc/check/launch_plans.cpp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    header = tmp_path / "csrc/include/launch_plan.h"
    text = header.read_text()
    assert text.count(old) == 1, f"launch_plan.h no longer holds {old!r}: update this test"
    header.write_text(text.replace(old, new))
    return tmp_path


def test_ptxas_report_parsed(resources):
    assert resources == {("select_kernel", "sm_80"): (34, 3376), ("select_kernel", "sm_90a"): (48, 3376)}
    assert cl.kernel_name("_Z1kPf") == "k"
    assert cl.kernel_name("_ZN6vtattn12_GLOBAL__N_113gather_kernelI5uint4EEvPKT_") == "gather_kernel"


def test_select_tokens_launches_pass(resources):
    failures, checked, refused, _ = cl.check_cuda(cl.Plans(), resources, SELECT_SHAPES)
    assert failures == {}
    assert checked > 50000 and refused > 0  # sm_86 / sm_89 refuse the longest segments


def test_check_catches_the_reverted_select_tokens_fix(resources, tmp_path):
    """The old rule opted in only when the dynamic part passed 48 KiB: with ptxas's 3376 static bytes,
    segments of 5723..6144 tokens launch with 48.1..48 KiB + 3376 bytes and no opt-in."""
    src = _source_with(tmp_path, "needs_opt_in(kSelectStaticSmem, dyn)", "dyn > kDefaultSmem")
    failures, _, _, _ = cl.check_cuda(cl.Plans(src), resources, SELECT_SHAPES)
    assert failures, "the check missed the launch failure"
    for (op, kernel, arch, kind), (count, first, message) in failures.items():
        assert (op, kernel, kind) == ("select_tokens", "select_kernel", "opt-in") and "without the opt-in" in message
        assert count == 6144 - 5723 + 1 and first == (1, 1, 5723), (arch, count, first)
    assert {arch for _, _, arch, _ in failures} == {"sm_80", "sm_86", "sm_89", "sm_90"}


def test_check_catches_a_static_smem_bound_ptxas_exceeds(resources, tmp_path):
    src = _source_with(tmp_path, "kSelectStaticSmem = 4096", "kSelectStaticSmem = 1024")
    failures, _, _, _ = cl.check_cuda(cl.Plans(src), resources, SELECT_SHAPES[:10])
    assert any(key[3] == "bound" and "the plan assumes at most 1024" in m for key, (_, _, m) in failures.items())


def test_select_tokens_refuses_what_a_device_cannot_hold():
    plans = cl.Plans()
    for arch in cl.ARCHS:
        most = plans.plan("select_max_segment", smem_optin=arch.smem_optin)["value"]
        assert plans.plan("select_tokens", 2, 1, most, smem_optin=arch.smem_optin)["error"] is None
        if most < 16384:
            assert "shared memory" in plans.plan("select_tokens", 2, 1, most + 1, smem_optin=arch.smem_optin)["error"]
    assert plans.plan("select_tokens", 65536, 1, 10, smem_optin=cl.ARCHS[0].smem_optin)["error"]


def test_cuda_caps_agree_with_the_plans(monkeypatch):
    """_cuda_caps (what dispatch sends to the CUDA kernels) mirrors the plans the launchers enforce:
    the same flash shared memory and refusals, the same longest select_tokens segment, per arch."""
    from types import SimpleNamespace

    import torch

    from vtattn import _cuda_caps
    plans = cl.Plans()
    assert _cuda_caps.SELECT_STATIC_SMEM == plans.plan("constants")["static_smem_bounds"]["select_kernel"]
    monkeypatch.setattr(_cuda_caps, "_device_reason", lambda t: None)
    for arch in cl.ARCHS:
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, o=arch.smem_optin: SimpleNamespace(shared_memory_per_block_optin=o))
        most = plans.plan("select_max_segment", smem_optin=arch.smem_optin)["value"]
        assert _cuda_caps.select_max_segment(arch.smem_optin) == most
        for L, ok in ((most, True), (most + 1, False)):
            args = (torch.zeros(2, 2 * L), torch.zeros(2, 2, dtype=torch.long), [L, L], L, True)
            assert (_cuda_caps.select_tokens_supports(*args) is None) == ok, (arch.name, L)
        for d in range(8, 136, 8):
            for extra in (0, _cuda_caps.INDEX_EXTRA_SMEM):
                plan = plans.plan("flash", 128, 1, 1, d, 2, 0, extra, smem_optin=arch.smem_optin)
                assert (_cuda_caps._flash_smem_reason("cuda:0", d, extra) is None) == (plan["error"] is None)
                assert not plan["launches"] or plan["launches"][0]["dyn_smem"] == _cuda_caps.flash_smem_bytes(d, extra)


def test_limits_each_launch_is_checked_against():
    arch = cl.ARCHS[1]  # sm_86: 99 KiB
    res = {("k", "sm_80"): (64, 1000)}
    ok = {"kernel": "k", "grid": [1, 65535, 1], "block": 1024, "dyn_smem": 0, "opt_in": False}
    assert cl.check_launch(ok, arch, res, {}) == []
    problem = lambda **kw: cl.check_launch({**ok, **kw}, arch, res, {})[0][1]  # noqa: E731
    assert "grid axis y = 65536" in problem(grid=[1, 65536, 1])
    assert "registers" in cl.check_launch(ok, arch, {("k", "sm_80"): (65, 0)}, {})[0][1]
    assert "without the opt-in" in problem(dyn_smem=48 * 1024)
    assert cl.check_launch({**ok, "dyn_smem": 48 * 1024, "opt_in": True}, arch, res, {}) == []
    assert "opt in to" in problem(dyn_smem=99 * 1024, opt_in=True)
    assert "no ptxas record" in cl.check_launch(ok, cl.ARCHS[3], res, {})[0][1]


def test_decode_split_count_and_merge_grid():
    plans = cl.Plans()
    p = plans.plan("decode_attention", 32, 32, 8, 16384, 128, smem_optin=cl.ARCHS[3].smem_optin, sms=132)
    split, merge = p["launches"]
    assert split["grid"][:2] == [32 * 8, p["splits"]] and merge["grid"][0] == 32 * 32
    assert p["splits"] * p["chunk"] >= 16384 and p["chunk"] % 128 == 0
    # B * Hq on the merge grid, not B * Hkv, must fit int32
    assert plans.plan("decode_attention", 2**28, 16, 2, 64, 64, smem_optin=1, sms=1)["error"]


def test_triton_config_limits():
    from vtattn import _check_triton as ct
    rec = {"kernel": "_k", "target": 80, "esize": 2, "block_d": 128, "meta": {}, "num_warps": 8, "num_stages": 3,
           "shared": 120 * 1024, "registers": 128, "estimate": 90 * 1024, "index": 0, "last": False}
    problems = ct.check_configs([rec], cl.ARCHS)
    assert any("sm_86" in p and "shared memory" in p for p in problems)  # kept there by its estimate
    assert not any("sm_80" in p and "shared memory" in p for p in problems)  # 163 KiB
    assert ct.check_configs([dict(rec, estimate=120 * 1024)], cl.ARCHS) == []  # filtered out on sm_86 / sm_89
    assert any("registers" in p for p in ct.check_configs([dict(rec, num_warps=16, registers=200)], cl.ARCHS))


def test_triton_grids(monkeypatch):
    pytest.importorskip("triton")
    from vtattn import _check_triton as ct
    problems, checked = ct.check_grids(cl.ARCHS)
    assert problems == [] and checked > 100
    from vtattn.triton_kernels import merge_tokens
    monkeypatch.setattr(merge_tokens, "MAX_GRID_YZ", 2**31)  # supports() no longer refuses B > 65535
    problems, _ = ct.check_grids(cl.ARCHS)
    assert problems and all("merge_tokens" in p and "axis y = 65536" in p for p in problems)


@pytest.mark.skipif(not (ROOT / "build" / "ptxas").is_dir(), reason="no ptxas reports: build with CUDA first")
def test_the_build_passes():
    done = subprocess.run([sys.executable, "-m", "vtattn.check_launches", "--skip-triton"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_select_tokens_segments_around_the_opt_in_on_the_device(dtype):
    """Segments whose static + dynamic shared memory crosses 48 KiB (5723..6144 tokens failed to launch
    before the fix), up to the longest the device holds, on the CUDA kernel vs the reference."""
    import torch

    import vtattn
    from vtattn import reference
    props = torch.cuda.get_device_properties(0)
    most = cl.Plans().plan("select_max_segment", smem_optin=props.shared_memory_per_block_optin)["value"]
    for L in sorted({1, 5722, 5723, 6000, 6144, 6145, most}):
        scores = torch.randn(3, 2 * L, device="cuda").round(decimals=2).to(getattr(torch, dtype))
        budgets = torch.tensor([[L // 3, L], [0, 1], [L, L // 2]], device="cuda")
        with vtattn.use_backend("cuda"):
            got = torch.ops.vtattn.select_tokens(scores, budgets, [L, L], 2 * L, True)
        want = reference.select_tokens(scores.cpu(), budgets.cpu(), [L, L], 2 * L, True)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w), L


@pytest.mark.gpu
def test_triton_launchers_stay_inside_bad_inputs_on_the_device():
    """tests/interpreter/test_triton_launch_safety.py's inputs, compiled for the device."""
    import torch

    from vtattn import reference
    from vtattn.triton_kernels.index_attention import index_attention
    B, Hq, Hkv, Nq, Nk, L, D = 2, 4, 2, 9, 20, 8, 16
    q = torch.randn(B, Hq, Nq, D, device="cuda")
    k, v = (torch.full((B, Hkv, Nk + 8, D), float("nan"), device="cuda").narrow(2, 3, Nk).normal_() for _ in range(2))
    idx = torch.tensor([[[3, -1, 7, 20, 2**40, 0, 19, -2**40]] * Hkv] * B, device="cuda")
    counts = torch.tensor([[L + 5, -3], [4, L]], dtype=torch.int32, device="cuda")
    pos_q, pos_k = torch.arange(Nk - Nq, Nk, device="cuda").expand(B, Nq), torch.arange(Nk, device="cuda").expand(B, Nk)
    out = index_attention(q, k, v, idx, counts, pos_q.contiguous(), pos_k.contiguous(), True, 0.25)
    clean = torch.tensor([[[3, 7, 0, 19, 0, 0, 0, 0], [0] * 8], [[3, 7, 0, 0, 0, 0, 0, 0], [3, 7, 0, 19, 0, 0, 0, 0]]])
    clean_counts = torch.tensor([[4, 0], [2, 4]], dtype=torch.int32)
    want = reference.index_attention(q.cpu(), k.cpu(), v.cpu(), clean, clean_counts, pos_q.cpu(), pos_k.cpu(), True,
                                     0.25)
    torch.testing.assert_close(out.cpu(), want, atol=1e-3, rtol=1e-3)
