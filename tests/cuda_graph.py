"""CUDA-graph capture checks shared by the GPU suites."""
import torch


def assert_graph_replays_step(step, q_latent):
    """step() (append then attention) captured into a CUDA graph: after
    q_latent changes in place, the replay gives what an eager step gives, and
    not the first eager result (the graph reads its inputs, not a copy)."""
    eager = step().clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = step()
    q_latent.copy_(torch.randn_like(q_latent))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, step())
    assert not torch.equal(static_out, eager)
