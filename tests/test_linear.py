"""decode_linear: against the float64 reference, row invariance, registration, and bad input."""

import pytest
import torch
from conftest import DEVICES, expect_kernel
from tolerances import DECODE_LINEAR_REL

import kforcing_ops as ko
from kforcing_ops import reference as ref

DTYPES = [torch.float32, torch.bfloat16]


def assert_close_to_float64(got, x, weight, bias):
    """|got - exact| <= DECODE_LINEAR_REL * (sum |x| |w| + |b|) elementwise, exact computed in float64."""
    xd, wd = x.double().reshape(-1, x.shape[-1]), weight.double()
    exact = xd @ wd.t() + (0 if bias is None else bias.double())
    scale = xd.abs() @ wd.abs().t() + (0 if bias is None else bias.double().abs()) + 1e-30
    err = (got.double().reshape(exact.shape) - exact).abs()
    assert bool((err <= DECODE_LINEAR_REL * scale).all()), f"max relative error {(err / scale).max().item():.3g}"


def make(rows, k, n, x_dtype, w_dtype, device, layout="contiguous", with_bias=True):
    if layout == "transposed":
        x = torch.randn(k, rows, device=device).t().to(x_dtype)
    elif layout == "stepped":
        x = torch.randn(rows, 2 * k, device=device).to(x_dtype)[:, ::2]
    elif layout == "offset":
        x = torch.randn(rows * k + 3, device=device).to(x_dtype)[3:].view(rows, k)
    else:
        x = torch.randn(rows, k, device=device).to(x_dtype)
    weight = torch.randn(n, k, device=device).to(w_dtype)
    bias = torch.randn(n, device=device).to(w_dtype) if with_bias else None
    return x, weight, bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16, 17])
@pytest.mark.parametrize("k,n", [(1, 1), (19, 37), (37, 19), (111, 111), (128, 64), (515, 33)])
def test_matches_float64(device, w_dtype, rows, k, n):
    x, weight, bias = make(rows, k, n, torch.float32, w_dtype, device)
    with expect_kernel("decode_linear"):
        got = ko.decode_linear(x, weight, bias)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert_close_to_float64(got, x, weight, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "stepped", "offset"])
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_strides_dtypes_and_bias(device, layout, x_dtype, with_bias):
    x, weight, bias = make(7, 53, 29, x_dtype, torch.float32, device, layout, with_bias)
    with expect_kernel("decode_linear"):
        got = ko.decode_linear(x, weight, bias)
    assert got.dtype == x_dtype
    if x_dtype == torch.float32:
        assert_close_to_float64(got, x, weight, bias)
    else:  # one bf16 rounding of the fp32 result
        torch.testing.assert_close(got, ref.decode_linear(x, weight, bias), atol=0, rtol=2 ** -8)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_are_rows(device):
    x = torch.randn(2, 3, 4, 40, device=device)
    weight = torch.randn(24, 40, device=device)
    got = ko.decode_linear(x, weight)
    assert got.shape == (2, 3, 4, 24)
    torch.testing.assert_close(got.reshape(24, 24), ko.decode_linear(x.reshape(24, 40), weight), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("k", [64, 100, 512])
def test_row_invariance(device, w_dtype, k):
    """A row's output is bitwise the same alone, among any number of rows, at any place among them."""
    x, weight, bias = make(40, k, 77, torch.float32, w_dtype, device)
    full = ko.decode_linear(x, weight, bias)
    for i in range(40):
        assert torch.equal(ko.decode_linear(x[i:i + 1], weight, bias)[0], full[i]), f"row {i} alone"
    perm = torch.randperm(40, device=device)
    assert torch.equal(ko.decode_linear(x[perm], weight, bias), full[perm])
    for rows in (2, 3, 7, 8, 16, 17):
        assert torch.equal(ko.decode_linear(x[5:5 + rows], weight, bias), full[5:5 + rows]), f"{rows} rows"


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    weight, bias = torch.randn(5, 8, device=device), torch.randn(5, device=device)
    assert ko.decode_linear(torch.randn(0, 8, device=device), weight, bias).shape == (0, 5)
    assert ko.decode_linear(torch.randn(3, 8, device=device), weight[:0], bias[:0]).shape == (3, 0)
    empty_k = ko.decode_linear(torch.randn(3, 0, device=device), torch.randn(5, 0, device=device), bias)
    torch.testing.assert_close(empty_k, bias.expand(3, 5), atol=0, rtol=0)
    assert torch.equal(ko.decode_linear(torch.randn(3, 0, device=device), torch.randn(5, 0, device=device)),
                       torch.zeros(3, 5, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    x, weight, bias = make(4, 33, 17, torch.float32, torch.bfloat16, device)
    torch.library.opcheck(torch.ops.kforcing.decode_linear.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.kforcing.decode_linear.default, (x.bfloat16(), weight.float(), None))
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(x, weight, bias):
        return ko.decode_linear(torch.relu(x), weight, bias) * 2

    with torch.no_grad():
        torch.testing.assert_close(layer(x, weight, bias), ko.decode_linear(torch.relu(x), weight, bias) * 2,
                                   atol=0, rtol=0)


def test_gradients_are_refused():
    x, weight = torch.randn(2, 8), torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        ko.decode_linear(x, weight)
    with torch.no_grad():
        ko.decode_linear(x, weight)  # fine without grad mode
    out = torch.ops.kforcing.decode_linear(x, weight, None)  # the raw op: the error comes at backward
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


@pytest.mark.parametrize("args,error,match", [
    (lambda: (torch.randn(2, 8), torch.randn(4, 9), None), ValueError, "in_features = weight.shape"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8, 1), None), ValueError, "`weight` must be 2-D"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), ValueError, "`bias` must have size 4"),
    (lambda: (torch.randn(2, 8).half(), torch.randn(4, 8), None), TypeError, "`x` must have dtype"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8).double(), None), TypeError, "`weight` must have dtype"),
    (lambda: (torch.tensor(1.0), torch.randn(4, 8), None), ValueError, "at least 1 dim"),
])
def test_errors_name_the_argument(args, error, match):
    x, weight, bias = args()
    with pytest.raises(error, match=match):
        ko.decode_linear(x, weight, bias)
    with pytest.raises(error, match=match):
        ref.decode_linear(x, weight, bias)
