"""The simulated CUDA device (tests/fake_cuda.py) catches what a real GPU would: these tests fail if it goes lax."""
import numpy as np
import pytest
import torch

from fake_cuda import FakeCudaTensor


def test_cuda_is_available_and_tensors_report_it(fake_cuda):
    from cytosae.devices import resolve_device

    assert torch.cuda.is_available() and resolve_device("auto").type == "cuda"
    x = torch.arange(6.0).to("cuda")
    assert isinstance(x, FakeCudaTensor) and x.device == torch.device("cuda", 0) and x.is_cuda
    y = torch.zeros(3, device="cuda")
    assert y.device.type == "cuda" and (x[:3] + y).device.type == "cuda"
    assert torch.randn(2, 2, device=resolve_device("cuda")).device.type == "cuda"
    assert torch.ones_like(x).device.type == "cuda" and x.new_zeros(2).device.type == "cuda"
    assert x.new_tensor([1.0]).device.type == "cuda" and torch.ones(2).type_as(x).device.type == "cuda"
    assert x.type_as(torch.ones(1)).device.type == "cpu"
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        resolve_device("cuda:1")


def test_mixing_a_cuda_and_a_cpu_tensor_raises(fake_cuda):
    x = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(4)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ones(4, 4) @ torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        torch.nn.Linear(4, 2)(x)
    assert float((x * torch.tensor(2.0)).sum()) == 8.0  # a 0-dim CPU tensor is a scalar to CUDA too
    assert x[torch.tensor([0, 2])].device.type == "cuda"  # CPU indices may index a CUDA tensor


def test_numpy_of_a_cuda_tensor_raises_and_cpu_copies_back(fake_cuda):
    x = torch.arange(3.0, device="cuda")
    with pytest.raises(TypeError, match="numpy"):
        x.numpy()
    with pytest.raises(TypeError, match="numpy"):
        np.asarray(x)
    back = x.cpu()
    assert type(back) is torch.Tensor and back.device.type == "cpu"
    np.testing.assert_array_equal(back.numpy(), [0.0, 1.0, 2.0])
    assert x.to("cpu").numpy().tolist() == [0.0, 1.0, 2.0] and x.tolist() == [0.0, 1.0, 2.0] and x[1].item() == 1.0


def test_a_cpu_generator_on_a_cuda_factory_raises(fake_cuda):
    with pytest.raises(RuntimeError, match="generator"):
        torch.randn(3, device="cuda", generator=torch.Generator().manual_seed(0))
    g = torch.Generator(device="cuda").manual_seed(0)
    assert g.device.type == "cuda" and torch.randn(3, device="cuda", generator=g).device.type == "cuda"
    with pytest.raises(RuntimeError, match="generator"):
        torch.randn(3, generator=g)


def test_backward_through_a_linear_moved_to_cuda(fake_cuda):
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    lin = torch.nn.Linear(4, 3)
    lin.load_state_dict(ref.state_dict())
    lin = lin.to("cuda")
    assert lin.weight.device.type == "cuda" and isinstance(lin.weight, torch.nn.Parameter)
    x = torch.randn(5, 4)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    loss = lin(x.to("cuda")).square().mean()
    loss.backward()
    assert lin.weight.grad.device.type == "cuda"
    ref(x).square().mean().backward()
    torch.testing.assert_close(lin.weight.grad.cpu(), ref.weight.grad)
    opt.step()
    assert lin.weight.device.type == "cuda" and not torch.equal(lin.weight.cpu(), ref.weight)


def test_pinned_memory_autocast_and_device_queries(fake_cuda):
    x = torch.ones(2, 3).pin_memory()
    assert x.is_pinned() and x.device.type == "cpu"
    assert x.to("cuda", non_blocking=True).device.type == "cuda"
    w = torch.ones(3, 3, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert (w @ w).dtype == torch.bfloat16
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.max_memory_allocated() >= 0
    free, total = torch.cuda.mem_get_info()
    assert 0 < free <= total and "Simulated" in torch.cuda.get_device_name(0)


def test_the_simulation_ends_with_the_test():
    assert not isinstance(torch.zeros(1), FakeCudaTensor)
    assert torch.Generator is torch._C.Generator or torch.Generator().device.type == "cpu"


def test_backward_through_autocast_and_a_custom_function_stays_on_the_gpu(fake_cuda):
    """Autograd formulas cast gradients back with the input's C++ device (CPU for the wrapper): they must stay
    on the simulated GPU, and a custom backward creating tensors with device=grad.device gets GPU ones."""
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * torch.full(g.shape, 2.0, device=g.device)

    lin = torch.nn.Linear(4, 3).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = Double.apply(lin(torch.ones(2, 4, device="cuda")))
    y.float().sum().backward()
    assert lin.weight.grad.device.type == "cuda" and lin.weight.grad.dtype == torch.float32
    torch.testing.assert_close(lin.weight.grad.cpu(), torch.full((3, 4), 4.0))


def test_threads_started_during_the_simulation_see_it(fake_cuda):
    import threading

    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.zeros(2, device="cuda")))
    t.start()
    t.join()
    assert isinstance(seen[0], FakeCudaTensor)
