"""Scale out on ``torch.distributed``: data, expert and pipeline parallelism, and what they communicate.

DeepSeek-V3's cost story is a communication story: its experts live on 64 GPUs in 8 nodes, every MoE
layer exchanges each token with the GPUs of its experts, and the schedule hides that traffic behind
computation. This package runs those ideas on PyTorch's own engine (gloo between CPU processes, NCCL
between GPUs) and measures them. Read in this order:

    process          the process group: torchrun's environment, gloo or NCCL, ``launch`` (forked gloo
                     processes for tests and lessons), ``on_main`` (rank 0 decides, every rank hears)
    data_parallel    DDP and FSDP2 for the one training loop (``LoopConfig.parallel``): shards of the same
                     global batch, the global expert loads for loss-free balancing, whole checkpoints
    expert_parallel  routed experts split over ranks: ``all_to_all_single`` dispatch and combine inside
                     autograd, ranks grouped into nodes, node-limited routing, the traffic counted
    comm             the closed form of that traffic, and DeepSeek-V3's H800 cluster in numbers
    pipeline         1F1B, zero-bubble (ZB-H1) and DualPipe schedules simulated on chunk times
    timing           the forward, backward and weight-gradient times of our own decoder blocks

Lesson 11 (``notebooks/11_parallelism.ipynb``) and ``benchmarks/bench_dist.py`` use all of it.
"""
