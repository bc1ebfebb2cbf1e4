"""How many graphs torch.compile makes for a model over a series of input sizes."""



def compiled_graph_count(model, sizes) -> int:
    """Graphs torch.compile makes for `model` over `sizes` ((batch, height, width) each), each output checked against
    eager to 1e-5. `aot_eager` traces and guards like the GPU compile without building kernels; reaching the recompile
    limit (past which dynamo silently runs the model eagerly) raises instead."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch.no_grad():
            compiled = torch.compile(model, backend=counter)
            for batch_size, height, width in sizes:
                generator = torch.Generator().manual_seed(height + width)
                pixel_values = torch.randn(batch_size, 3, height, width, generator=generator)
                torch.testing.assert_close(
                    compiled(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state, atol=1e-5, rtol=0
                )
    finally:
        torch._dynamo.reset()
    return counter.frame_count
