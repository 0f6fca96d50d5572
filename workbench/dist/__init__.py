"""Scale out on ``torch.distributed``: data, expert and pipeline parallelism, and what they communicate.

process         the process group (gloo on CPU, NCCL on CUDA, torchrun's environment), ``launch``
data_parallel   DDP and FSDP2 for the training loop; global expert loads for loss-free balancing
"""
