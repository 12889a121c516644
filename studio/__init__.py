"""Apertis Studio: the Gradio app, its training job manager and its workspace registry."""
