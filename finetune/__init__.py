"""finetune: the SaFeR-CLIP training application (data, anchors, targets, curriculum, losses, trainer).

It exports encoder folders that `safer_diffusion` loads; `safer_diffusion` never imports it.
"""
