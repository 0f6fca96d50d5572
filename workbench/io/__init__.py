"""Checkpoint I/O: safe files (``files``: atomic writes, safetensors only), the Hugging Face layout
(``hf``), DeepSeek's FP8 layout (``fp8_layout``) and the tokenizer (``tokenizer``)."""
