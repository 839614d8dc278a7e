"""The README's whole-step CUDA-graph recipe: a graphed training step of an adapted model does what the eager step
does (same losses, same trained A and B), in bf16 and float32, with a learning-rate schedule held in a tensor."""

from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_llama

import minipissa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

WARMUP, STEPS = 3, 5


def recipe_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # a graph keeps its gradient buffers
    return loss.detach()


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    trained = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trained, lr=torch.tensor(1e-2, device="cuda"), fused=True, capturable=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_graphed_step_trains_as_the_eager_step(dtype: torch.dtype) -> None:
    base = minipissa.apply(tiny_llama(0, dtype=dtype), 4, ["q_proj", "v_proj", "down_proj"]).cuda().train()
    eager, graphed = base, copy.deepcopy(base)
    batches = torch.randint(0, 128, (WARMUP + STEPS, 2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    lrs = [1e-2 * 0.8**i for i in range(WARMUP + STEPS)]  # a schedule: the lr tensor is filled before each step

    opt_eager = optimizer_for(eager)
    eager_losses = []
    for ids, lr in zip(batches, lrs, strict=True):
        opt_eager.param_groups[0]["lr"].fill_(lr)
        eager_losses.append(recipe_step(eager, opt_eager, ids))

    opt = optimizer_for(graphed)
    static_ids = batches[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graphed_losses = []
    with torch.cuda.stream(side):  # warm-up steps (real updates, on real batches) on a side stream
        for ids, lr in zip(batches[:WARMUP], lrs[:WARMUP], strict=True):
            static_ids.copy_(ids)
            opt.param_groups[0]["lr"].fill_(lr)
            graphed_losses.append(recipe_step(graphed, opt, static_ids))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture runs nothing
        static_loss = recipe_step(graphed, opt, static_ids)
    for ids, lr in zip(batches[WARMUP:], lrs[WARMUP:], strict=True):
        static_ids.copy_(ids)
        opt.param_groups[0]["lr"].fill_(lr)
        graph.replay()
        graphed_losses.append(static_loss.clone())

    # The same kernels on the same inputs: equal up to the order of atomics in a few backward kernels.
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(torch.stack(graphed_losses), torch.stack(eager_losses), **tol)
    moved = 0.0
    for (name, layer), (_, twin) in zip(minipissa.pissa_layers(eager), minipissa.pissa_layers(graphed), strict=True):
        torch.testing.assert_close(twin.A, layer.A, **tol, msg=lambda m, n=name: f"{n}.A: {m}")
        torch.testing.assert_close(twin.B, layer.B, **tol, msg=lambda m, n=name: f"{n}.B: {m}")
        moved = max(moved, (layer.A - layer.A0.to(layer.A.device)).abs().max().item())
    assert moved > 1e-3  # the steps did train
