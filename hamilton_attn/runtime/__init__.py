"""Everything that talks to torch.distributed: the executor, the transports, the tensor
side of dispatch, CUDA-graph replay and the profiler. Import the submodules
(``runtime.executor``, ``runtime.shard``, ...); this package imports nothing eagerly,
so the planner can use ``runtime.comm`` without pulling in the executor."""
