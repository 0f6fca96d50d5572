"""Serving: prompt sets (``prompts``) that call a model with validated templates and inputs."""
