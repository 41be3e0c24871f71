"""inkwash: text-to-image diffusion, DDPM to FLUX, in one readable codebase.

pipe = inkwash.load()            # the bundled Shapes model; or a model file, or a preset name
images = pipe("a red circle above a blue square", steps=20, seed=0)
"""

__version__ = "0.1.0"


def load(path_or_preset=None, device="cpu", **options):
    """Load a model file (inkwash's, a Stable Diffusion / SDXL single file, a diffusers folder), a named preset
    (untrained), or the bundled model; returns a Pipeline. Options: tokenizer=, prediction= (see pipeline.load)."""
    from .pipeline import load as _load

    return _load(path_or_preset, device, **options)


__all__ = ["load", "__version__"]
