"""The Gradio demo (`python demos/app.py`); a thin UI over :mod:`safer_diffusion`."""
