"""Checkpoint I/O: safe files (``files``: atomic writes, safetensors only), the Hugging Face layout
(``names``: every naming rule; ``headers``: a folder's files and safetensors headers; ``plan``: what each
stored tensor becomes, from the headers alone; ``stream``: a meta-device model filled shard by shard;
``hf``: ``load_hf`` / ``save_hf``), layer-by-layer execution of checkpoints bigger than memory
(``layered``), DeepSeek's FP8 layout (``fp8_layout``) and the tokenizer (``tokenizer``)."""
