"""The Gradio demo (`python demos/app.py`) over :mod:`safer_diffusion`: ``app`` (layout, events, command line),
``validation`` (every input), ``service`` (pipeline loading and the pool of pipeline views), ``rendering``
(verdicts, blur, text)."""
