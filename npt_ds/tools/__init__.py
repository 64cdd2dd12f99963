"""User-facing commands that use a trained NPT model: generate, export, inject, inject-eval."""
